"""A report of a training run, as one HTML file or Markdown with a figures folder: ``report``.

It holds the verdict of ``diagnose``, the run's settings and log Z estimates, the training
curves, the density (2-D events) or samples (images), and ArviZ's plots and summary of the
recorded chains.
"""

from __future__ import annotations

import base64
import html
import math
import os
import shutil
import tempfile

from numpyro_ebm import _io
from numpyro_ebm.diagnostics._shared import FitResult, fit_attrs
from numpyro_ebm.diagnostics.arviz import to_datatree
from numpyro_ebm.diagnostics.checks import Diagnosis, diagnose
from numpyro_ebm.diagnostics.lag import chain_lag, has_chains

__all__ = ["FIGURE_NAMES", "figures_folder", "figures_folder_problem", "report"]

# every figure a report can draw: a Markdown report's figures folder holds some of these
FIGURE_NAMES = frozenset(
    ("training.png", "density.png", "samples.png", "trace.png", "rank.png", "energy.png")
)


def report(
    res: FitResult,
    path: str | os.PathLike,
    *,
    data=None,
    toy=None,
    key=None,
    title: str | None = None,
    max_coordinates: int = 4,
    lag_key=None,
) -> str:
    """Write a report of a training run: verdict, settings, curves, density, chains.

    ``.html``: one self-contained file (figures embedded). ``.md``: Markdown with the figures
    as PNG files in a folder ``<name>_files`` next to it; an existing such folder is replaced
    only when it holds nothing but an earlier report's figures (``FIGURE_NAMES``). Everything
    is written to temporary names and renamed, so an interrupted report leaves no
    half-written file.

    Args:
        res: the ``FitResult``.
        path: output file, ending in ``.html`` or ``.md``.
        data: the training data (for the density-vs-data figure of 2-D events).
        toy: a ``datasets.ToyDensity``: show its exact density (2-D events), and check the
            held-out NLL against its entropy (``diagnose(..., data_entropy=)``).
        key: with ``toy``, a PRNG key for fresh test points: the report then gives
            ``KL(toy ‖ model)`` with grid-exact log Z (``evaluate.kl_to_toy``).
        title: heading (default: from the settings).
        max_coordinates: chain plots and the summary table show the first this many event
            coordinates.
        lag_key: a PRNG key: run ``chain_lag`` (1000 sampler steps of the final chains) and
            add its check after ``energy_gap``, which it explains (runs without chains are
            reported without it).

    Returns:
        ``path`` as a string.

    Raises:
        ValueError: ``path`` is a folder or has another suffix, or (``.md``) its ``_files``
            folder holds something else than an earlier report's figures; nothing is written.

    Example:
        >>> from numpyro_ebm import diagnostics
        >>> diagnostics.report(res, "run.html", data=data)  # doctest: +SKIP
        'run.html'
    """
    path = os.fspath(path)
    kind = os.path.splitext(path)[1].lower()
    if kind not in (".html", ".md"):
        raise ValueError(f"report path must end in .html or .md, got {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"report path {path!r} is a folder; name a file")
    problem = figures_folder_problem(path) if kind == ".md" else None
    if problem is not None:
        raise ValueError(f"{problem}; move it away or write the report elsewhere")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    figures_name = os.path.basename(figures_folder(path))
    attrs = fit_attrs(res)
    diagnosis = diagnose(res, data_entropy=None if toy is None else toy.entropy(), verbose=False)
    if lag_key is not None and has_chains(res):
        diagnosis = _with_lag(diagnosis, chain_lag(res, key=lag_key).check)
    dt = to_datatree(res) if res.recorded_chains is not None else None

    work = tempfile.mkdtemp(dir=folder, prefix=".tmp-report-")
    try:
        figures = _model_figures(res, data, toy, work)
        summary = None
        if dt is not None:
            chain_figures, summary = _chain_figures(dt, work, max_coordinates)
            figures += chain_figures
        sections = {
            "title": title or f"numpyro_ebm training report: {attrs['negatives']} negatives",
            "verdict": diagnosis.verdict,
            "checks": (["status", "check", "value", "rule", "meaning"], diagnosis.rows()),
            "settings": (["setting", "value"], _settings_rows(res, attrs, data, toy, key)),
            "summary": summary,
            "figures": figures,
        }
        if kind == ".html":
            text = _html(sections, work)
            _io.atomic_write(path, lambda f: f.write(text.encode("utf-8")))
        else:
            text = _markdown(sections, figures_name)
            _install_markdown(work, text, [name for name, _ in figures], path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def _with_lag(diagnosis: Diagnosis, lag) -> Diagnosis:
    """``diagnosis`` with the ``chain_lag`` check right after ``energy_gap`` (or last)."""
    names = [check.name for check in diagnosis.checks]
    at = names.index("energy_gap") + 1 if "energy_gap" in names else len(names)
    return Diagnosis([*diagnosis.checks[:at], lag, *diagnosis.checks[at:]])


def _save(fig_or_pc, work: str, name: str) -> None:
    """Write a matplotlib figure or an ArviZ ``PlotCollection`` to ``work/name``."""
    from numpyro_ebm import plots

    target = os.path.join(work, name)
    if hasattr(fig_or_pc, "savefig") and not hasattr(fig_or_pc, "canvas"):
        fig_or_pc.savefig(target)  # an ArviZ PlotCollection
    else:
        plots.save_figure(fig_or_pc, target)


def _model_figures(res: FitResult, data, toy, work: str) -> list[tuple[str, str]]:
    """The training curves, and the density (2-D events) or samples (images): ``(file name,
    caption)`` of each figure written to ``work``."""
    from numpyro_ebm import plots

    event_shape = tuple(res.event_shape)
    size = math.prod(event_shape)
    _save(plots.training_curves(res.history), work, "training.png")
    figures = [("training.png", "Training curves.")]
    if event_shape == (2,):
        figure = plots.density_figure(res.energy, data, samples=res.chains, toy=toy, log_z=None)
        _save(figure, work, "density.png")
        figures.append(
            (
                "density.png",
                "Data (or the true density), the learned density normalised on the plotted box "
                "by quadrature, and the final negative-phase chains.",
            )
        )
    elif size >= 16 and (len(event_shape) == 2 or math.isqrt(size) ** 2 == size):
        _save(plots.sample_grid(res.chains, num=64), work, "samples.png")
        figures.append(("samples.png", "Final negative-phase chains as images."))
    return figures


def _chain_figures(dt, work: str, max_coordinates: int):
    """ArviZ's trace, rank and (HMC) energy plots of the recorded chains, written to ``work``,
    and their ``az.summary`` as ``(header, rows)``."""
    import arviz as az

    var = next(iter(dt["posterior"].data_vars))
    sel = {}
    for dim in dt["posterior"][var].dims[2:]:
        sel[dim] = dt["posterior"][dim].values[:max_coordinates]
    if len(dt["posterior"][var].dims) > 3:  # images: pick coordinates of the flat index
        sel = {d: v[:2] for d, v in sel.items()}
    _save(az.plot_trace_dist(dt, coords=sel, compact=False), work, "trace.png")
    figures = [
        (
            "trace.png",
            "Recorded negative-phase chains (second half of training): trace and marginals.",
        )
    ]
    _save(az.plot_rank(dt, coords=sel), work, "rank.png")
    figures.append(("rank.png", "Rank plots: uniform when chains mix."))
    if "energy" in dt["sample_stats"].data_vars:
        _save(az.plot_energy(dt), work, "energy.png")
        figures.append(("energy.png", "HMC energy transition vs marginal energy."))
    table = az.summary(dt, coords=sel)
    rows = [
        [str(i), *(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row)]
        for i, row in zip(table.index, table.to_numpy(), strict=True)
    ]
    summary = (["", *map(str, table.columns)], rows) if rows else None
    return figures, summary


def _settings_rows(res: FitResult, attrs: dict, data, toy, key) -> list[tuple[str, str]]:
    """The run's settings and its log Z estimates, as ``(setting, value)`` rows."""
    rows = [
        ("negatives", attrs["negatives"]),
        ("sampler", attrs["kernel"]),
        ("chains × MCMC steps per update", f"{attrs['num_chains']} × {attrs['num_mcmc_steps']}"),
        ("training steps", str(attrs["num_steps"])),
        ("event shape", str(tuple(res.event_shape))),
        ("learned log Z (NCE)", f"{attrs['log_z_learned']:.4f}"),
    ]
    if "log_z_ais" in attrs:
        rows.append(("log Z (AIS)", f"{attrs['log_z_ais']:.4f} ± {attrs['log_z_ais_stderr']:.4f}"))
    rows.extend(_log_z_rows(res, data, toy, key))
    return rows


def figures_folder(path: str | os.PathLike) -> str:
    """The folder of a Markdown report's figures: ``<name>_files`` next to ``path``."""
    return f"{os.path.splitext(os.fspath(path))[0]}_files"


def figures_folder_problem(path: str | os.PathLike) -> str | None:
    """Why a ``.md`` report at ``path`` may not replace its figures folder (None when there is
    none, or it holds only files named like an earlier report's figures)."""
    final = figures_folder(path)
    if not os.path.lexists(final):
        return None
    if os.path.islink(final) or not os.path.isdir(final):
        return f"{final} exists and is not a folder of report figures"
    others = sorted(
        name
        for name in os.listdir(final)
        if name not in FIGURE_NAMES
        or os.path.islink(os.path.join(final, name))
        or not os.path.isfile(os.path.join(final, name))
    )
    if not others:
        return None
    listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
    return f"{final} holds files that no earlier report wrote ({listed})"


def _install_markdown(work: str, text: str, names: list[str], path: str) -> None:
    """Put the figures ``names`` (in ``work``) and the Markdown ``text`` in place: both are
    written under ``work`` first, then renamed; an old figures folder is moved into ``work``
    (a rename cannot replace a folder that has files), and put back if a rename fails."""
    final = os.path.abspath(figures_folder(path))
    staged, old = os.path.join(work, "figures"), os.path.join(work, "old")
    os.makedirs(staged)
    for name in names:
        os.replace(os.path.join(work, name), os.path.join(staged, name))
    _io.fsync_folder(staged)
    markdown = os.path.join(work, "report.md")
    _io.write_synced(markdown, text.encode("utf-8"))
    problem = figures_folder_problem(path)  # again: it may have changed while drawing
    if problem is not None:
        raise ValueError(f"{problem}; move it away or write the report elsewhere")
    moved = os.path.lexists(final)
    if moved:
        os.replace(final, old)
    try:
        os.replace(staged, final)
        os.replace(markdown, path)
    except BaseException:
        if not os.path.lexists(staged):  # the new folder is in place: take it back
            os.replace(final, staged)
        if moved:
            os.replace(old, final)
        raise
    _io.fsync_folder(os.path.dirname(final))


def _log_z_rows(res: FitResult, data, toy, key) -> list[tuple[str, str]]:
    """2-D events: log Z by quadrature (and the exact KL to a toy, given a key)."""
    from numpyro_ebm import evaluate, logz

    if tuple(res.event_shape) != (2,):
        return []
    if toy is not None and key is not None:
        kl = evaluate.kl_to_toy(res.energy, toy, key=key)
        return [
            ("log Z (grid quadrature)", f"{kl.log_z.value:.4f}"),
            ("KL(toy ‖ model), grid log Z", f"{kl.kl:.4f} ± {kl.kl_stderr:.4f} nats"),
            ("test NLL (toy entropy)", f"{kl.test_nll:.4f} ({kl.entropy:.4f})"),
        ]
    if toy is None and data is None:
        return []
    bounds = None if toy is None else toy.bounds
    log_z = logz.select.estimate(res.energy, (2,), method="grid", data=data, bounds=bounds)
    return [("log Z (grid quadrature)", f"{log_z.value:.4f}")]


def _sections(sections: dict, *, heading, bold, table, figure) -> list[str]:
    """The report's parts in order, drawn with one format's ``heading``/``bold``/``table``/
    ``figure``."""
    parts = [
        heading(1, sections["title"]),
        bold(sections["verdict"]),
        heading(2, "Checks"),
        table(*sections["checks"]),
        heading(2, "Settings"),
        table(*sections["settings"]),
    ]
    if sections["summary"]:
        parts += [heading(2, "Recorded chains: az.summary"), table(*sections["summary"])]
    parts.append(heading(2, "Figures"))
    parts += [figure(name, caption) for name, caption in sections["figures"]]
    return parts


def _html(sections: dict, work: str) -> str:
    esc = html.escape

    def table(header, rows):
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def figure(name, caption):
        with open(os.path.join(work, name), "rb") as f:
            encoded = base64.b64encode(f.read()).decode("ascii")
        return (
            f"<figure><img src='data:image/png;base64,{encoded}' alt='{esc(name)}'>"
            f"<figcaption>{esc(caption)}</figcaption></figure>"
        )

    head = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{esc(sections['title'])}</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "img{max-width:100%}</style></head><body>"
    )
    body = _sections(
        sections,
        heading=lambda level, text: f"<h{level}>{esc(text)}</h{level}>",
        bold=lambda text: f"<p><b>{esc(text)}</b></p>",
        table=table,
        figure=figure,
    )
    return "\n".join([head, *body, "</body></html>"])


def _markdown(sections: dict, figures_name: str) -> str:
    def cell(x):
        return str(x).replace("|", "\\|")

    def table(header, rows):
        lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
        return "\n".join(lines)

    parts = _sections(
        sections,
        heading=lambda level, text: "#" * level + " " + text,
        bold=lambda text: f"**{text}**",
        table=table,
        figure=lambda name, caption: f"![{caption}]({figures_name}/{name})\n\n*{caption}*",
    )
    return "\n\n".join(parts) + "\n"
