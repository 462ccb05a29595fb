"""The `numpyro-ebm demo` command end to end (tiny run)."""

import pytest

from numpyro_ebm import cli


def test_demo_prints_the_table_and_writes_the_plot(tmp_path, capsys):
    code = cli.main(
        ["demo", "--steps", "20", "--num-data", "2000", "--quiet", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert code == 0
    for row in ("test NLL", "entropy bound", "KL(data ‖ model)", "training time"):
        assert row in out
    png = tmp_path / "8gaussians_density.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["8gaussians_density.png"]  # no temp files


def test_demo_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["demo", "--steps", "0"])
    assert err.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["demo", "--toy", "moons"])
