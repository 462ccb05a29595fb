"""Tests for numpyro_ebm.validation."""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from numpyro_ebm.gaussian import fit_base
from numpyro_ebm.validation import (
    UNIT_SCALE_LIMIT,
    DataScaleWarning,
    validate_data,
    validate_event_shape,
    warn_if_not_unit_scale,
)

FAST = settings(max_examples=40, deadline=None)

# --------------------------------------------------------------------------------------------
# validate_event_shape
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event_shape", "expected"),
    [(2, (2,)), (np.int64(3), (3,)), ((), ()), ([8, 8], (8, 8)), ((0, 5), (0, 5))],
)
def test_validate_event_shape_accepts(event_shape, expected):
    out = validate_event_shape(event_shape)
    assert out == expected
    assert isinstance(out, tuple) and all(type(d) is int for d in out)


@pytest.mark.parametrize("event_shape", [2.0, "2", None, True, (2, 1.5), (2, None), [False]])
def test_validate_event_shape_rejects_types(event_shape):
    with pytest.raises(TypeError, match="event_shape"):
        validate_event_shape(event_shape)


@pytest.mark.parametrize("event_shape", [-1, (2, -3)])
def test_validate_event_shape_rejects_negative(event_shape):
    with pytest.raises(ValueError, match="non-negative"):
        validate_event_shape(event_shape)


# --------------------------------------------------------------------------------------------
# validate_data: valid input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_valid_numpy_passes_through_unchanged(dtype):
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(dtype)
    out = validate_data(x, event_shape=(3,))
    assert isinstance(out, jax.Array)
    assert out.dtype == jnp.asarray(x).dtype  # float64 -> float32 unless x64 is enabled
    np.testing.assert_array_equal(np.asarray(out), x.astype(out.dtype))


def test_valid_jax_and_list_inputs():
    x = jnp.arange(6.0, dtype=jnp.bfloat16).reshape(3, 2)
    out = validate_data(x, event_shape=2)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(x, np.float32))
    out = validate_data([[1.0, 2.0], [3.0, 4.5]])
    np.testing.assert_array_equal(out, jnp.array([[1.0, 2.0], [3.0, 4.5]]))
    # Scalar events and extra leading batch dimensions.
    assert validate_data(np.zeros(5), event_shape=()).shape == (5,)
    assert validate_data(np.zeros((4, 5, 2)), event_shape=(2,)).shape == (4, 5, 2)


@FAST
@given(
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_float_shapes_pass(shape, dtype, seed):
    x = np.random.default_rng(seed).uniform(-1e3, 1e3, size=shape).astype(dtype)
    out = validate_data(x)
    assert out.shape == x.shape
    np.testing.assert_array_equal(np.asarray(out), x.astype(out.dtype))
    out = validate_data(x, event_shape=tuple(shape[1:]))
    assert out.shape == x.shape


# --------------------------------------------------------------------------------------------
# validate_data: errors
# --------------------------------------------------------------------------------------------


def test_nan_reports_count_and_first_row():
    x = np.zeros((10, 2), dtype=np.float32)
    x[3, 1] = np.nan
    x[7, :] = np.nan
    with pytest.raises(ValueError, match="x_train") as info:
        validate_data(x, event_shape=(2,), name="x_train")
    msg = str(info.value)
    assert "3 non-finite values (3 NaN, 0 inf)" in msg
    assert "2 of 10 points" in msg
    assert "index 3" in msg


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_inf_reported(value):
    x = np.ones((4, 3))
    x[2, 0] = value
    with pytest.raises(ValueError, match=r"1 non-finite value \(0 NaN, 1 inf\).*index 2"):
        validate_data(x)


def test_nan_in_jax_array_with_batch_dims():
    x = jnp.zeros((3, 4, 2)).at[1, 2, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"NaN.*index \(1, 2\)"):
        validate_data(x, event_shape=(2,))


@FAST
@given(
    n=st.integers(1, 50),
    d=st.integers(1, 4),
    bad=st.lists(st.tuples(st.integers(0, 49), st.integers(0, 3)), min_size=1, max_size=5),
    use_jax=st.booleans(),
)
def test_random_nan_positions_reported(n, d, bad, use_jax):
    x = np.zeros((n, d), dtype=np.float32)
    cells = {(i % n, j % d) for i, j in bad}
    for i, j in cells:
        x[i, j] = np.nan
    rows = {i for i, _ in cells}
    data = jnp.asarray(x) if use_jax else x
    with pytest.raises(ValueError) as info:
        validate_data(data, event_shape=(d,))
    msg = str(info.value)
    assert f"{len(cells)} non-finite value" in msg
    assert f"{len(rows)} of {n} points" in msg
    assert f"first bad row at index {min(rows)}." in msg


@pytest.mark.parametrize(
    "x",
    [
        np.zeros((3, 2), dtype=np.int32),
        np.zeros((3, 2), dtype=np.uint8),
        np.zeros((3, 2), dtype=bool),
        np.zeros((3, 2), dtype=np.complex64),
        np.array([[1.0, None]], dtype=object),
        [[1, 2], [3, 4]],
        jnp.zeros((3, 2), dtype=jnp.int32),
    ],
    ids=["int32", "uint8", "bool", "complex", "object", "int-list", "jax-int"],
)
def test_non_float_dtype(x):
    with pytest.raises(ValueError, match=r"floating-point dtype.*cast to float32.*astype"):
        validate_data(x)


@pytest.mark.parametrize("x", [[[1.0, 2.0], [3.0]], "not an array", {"a": 1.0}])
def test_not_convertible_or_not_float(x):
    with pytest.raises(ValueError, match="data"):
        validate_data(x)


def test_ragged_list_message():
    with pytest.raises(ValueError, match="could not be converted to an array"):
        validate_data([[1.0, 2.0], [3.0]])


@pytest.mark.parametrize(
    ("shape", "event_shape"), [((5,), None), ((), None), ((2,), (2,)), ((8, 8), (8, 8))]
)
def test_wrong_rank(shape, event_shape):
    with pytest.raises(ValueError, match="rank"):
        validate_data(np.zeros(shape), event_shape=event_shape)


def test_wrong_event_shape_shows_expected_and_got():
    with pytest.raises(ValueError, match=r"expected trailing dimensions \(2,\), got \(3,\)"):
        validate_data(np.zeros((5, 3)), event_shape=(2,))
    with pytest.raises(ValueError, match=r"expected trailing dimensions \(64,\), got \(8, 8\)"):
        validate_data(np.zeros((5, 8, 8)), event_shape=(64,))


@pytest.mark.parametrize(("shape", "event_shape"), [((0, 2), (2,)), ((0, 2), None)])
def test_empty(shape, event_shape):
    with pytest.raises(ValueError, match="zero points"):
        validate_data(np.zeros(shape, dtype=np.float32), event_shape=event_shape)


def test_bad_event_shape_argument():
    with pytest.raises(TypeError, match="event_shape"):
        validate_data(np.zeros((3, 2)), event_shape=2.0)


def test_tracer_under_jit():
    @jax.jit
    def f(x):
        return validate_data(x)

    with pytest.raises(TypeError, match=r"outside jax\.jit"):
        f(jnp.zeros((3, 2)))

    @jax.jit
    def g(x):
        return validate_data([x, x])

    with pytest.raises(TypeError, match=r"outside jax\.jit"):
        g(jnp.zeros(2))


# --------------------------------------------------------------------------------------------
# fit_base: the Gaussian fitted to the data needs data with some spread
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (jnp.full((10, 2), 0.1), "its 10 rows are all the same point"),
        (jnp.array([[1.0, 2.0]]), r"has 1 row\(s\)"),
        (jnp.zeros((0, 2)), r"has 0 row\(s\)"),
    ],
)
def test_fit_base_refuses_data_without_spread(data, message):
    """Otherwise its scale_tril and log Z are NaN and training fails much later."""
    with pytest.raises(ValueError, match=message):
        fit_base(data)


def test_fit_base_still_fits_traced_data_and_data_with_one_constant_column():
    data = jnp.stack([jnp.arange(4.0), jnp.full(4, 3.0)], axis=1)
    eager = fit_base(data)
    assert bool(jnp.all(jnp.isfinite(eager.scale_tril)))
    np.testing.assert_allclose(eager.mean, [1.5, 3.0])
    traced = jax.jit(fit_base)(data)
    np.testing.assert_allclose(traced.scale_tril, eager.scale_tril, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# warn_if_not_unit_scale: data far from the scale the defaults are tuned for
# --------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised in place of the training's first compute (core.init)."""


def _stop(*args, **kwargs):
    raise _Stop


def test_data_far_from_unit_scale_warn_naming_the_coordinate():
    data = np.zeros((4, 3))
    data[:, 2] = [0.0, 0.0, 30.0, -30.0]  # root-mean-square 21.2 about the origin
    with pytest.warns(DataScaleWarning, match=r"coordinate 2 has a root-mean-square of 21.2"):
        warn_if_not_unit_scale(data)


@pytest.mark.parametrize("scale", [1.0, UNIT_SCALE_LIMIT])
def test_data_within_the_limit_and_traced_data_do_not_warn(scale, recwarn):
    data = np.zeros((4, 2))
    data[:, 0] = [scale, -scale, scale, -scale]  # root-mean-square exactly `scale`
    warn_if_not_unit_scale(data)
    jax.jit(lambda x: warn_if_not_unit_scale(100.0 * x) or x)(data)
    assert not [w for w in recwarn if w.category is DataScaleWarning]


def test_fit_warns_before_any_compute_at_the_callers_line(monkeypatch):
    """The rings toy scaled by 100 trains to an energy gap of +199 nats in 400 steps without an
    error (MLPEnergy's confinement 0.01‖x‖² is about 760 nats there): fit says so before
    training, at the user's line, not inside the library."""
    import numpyro_ebm as ebm
    from numpyro_ebm.training import core

    monkeypatch.setattr(core, "init", _stop)
    data = 100.0 * ebm.datasets.toy("rings").sample(jax.random.key(0), 500)
    energy = ebm.energies.MLPEnergy(2, hidden=(8,), key=jax.random.key(1))
    with pytest.warns(DataScaleWarning, match="Standardize first") as caught, pytest.raises(_Stop):
        ebm.fit(energy, data, key=jax.random.key(2), num_steps=10)
    assert caught[0].filename == __file__
    with pytest.raises(_Stop):  # standardized, the same data go through silently
        with warnings.catch_warnings():
            warnings.simplefilter("error", DataScaleWarning)
            ebm.fit(energy, data / data.std(0), key=jax.random.key(2), num_steps=10)


def test_conditions_are_not_judged_only_the_data(monkeypatch):
    """Conditions may be class labels (0 … 19 has a root-mean-square of 11) or noise levels
    that the energy is built for: no warning for them; the data still get one."""
    import numpyro_ebm as ebm
    from numpyro_ebm.training import core

    monkeypatch.setattr(core, "init", _stop)
    labels = (jnp.arange(200) % 20).astype(jnp.float32)[:, None]
    energy = jax.tree_util.Partial(lambda m, x, c: 0.5 * jnp.sum((x - m * c) ** 2), jnp.zeros(()))
    x = jax.random.normal(jax.random.key(4), (200, 1))
    with warnings.catch_warnings(), pytest.raises(_Stop):
        warnings.simplefilter("error", DataScaleWarning)
        ebm.fit(energy, x, condition=labels, key=jax.random.key(3), num_steps=10)
    with pytest.warns(DataScaleWarning, match="data: coordinate 0"), pytest.raises(_Stop):
        ebm.fit(energy, 50.0 + x, condition=labels, key=jax.random.key(3), num_steps=10)


def test_nested_lists_warn_and_a_users_file_named_like_the_package_is_not_skipped():
    with pytest.warns(DataScaleWarning, match="root-mean-square of 177"):
        warn_if_not_unit_scale([[0.0, 1.0], [250.0, -1.0]])
    import numpyro_ebm

    # a script beside the package whose name starts like its folder (numpyro_ebm_demo.py)
    beside = os.path.dirname(numpyro_ebm.__file__) + "_demo.py"
    code = compile("warn_if_not_unit_scale([[0.0], [250.0]])", beside, "exec")
    with pytest.warns(DataScaleWarning) as caught:
        exec(code, {"warn_if_not_unit_scale": warn_if_not_unit_scale})
    assert caught[0].filename == beside


def test_maximum_likelihood_warns_for_an_ebm_site_far_from_unit_scale(monkeypatch):
    import numpyro
    import optax

    import numpyro_ebm as ebm
    from numpyro_ebm.training import core

    def model(data):
        mu = numpyro.param("mu", jnp.zeros(2))
        energy = jax.tree_util.Partial(lambda m, x: 0.5 * jnp.sum((x - m) ** 2), mu)
        with numpyro.plate("data", data.shape[0]):
            numpyro.sample("x", ebm.EnergyDistribution(energy, (2,)), obs=data)

    monkeypatch.setattr(core, "init", _stop)
    data = 50.0 + jax.random.normal(jax.random.key(0), (100, 2))
    learner = ebm.MaximumLikelihood(model, optax.adam(1e-2), num_chains=8, track_log_z=False)
    with pytest.warns(DataScaleWarning, match="site 'x'") as caught, pytest.raises(_Stop):
        learner.init(jax.random.key(1), data)
    assert caught[0].filename == __file__
