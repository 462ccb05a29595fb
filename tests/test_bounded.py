"""``bounded``: the logit map of a box onto the real line, its Jacobian, and the density it
gives an energy's distribution on the box."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy import integrate, special, stats

import numpyro_ebm as ebm
from numpyro_ebm.bounded import logit_box, unbounded


def test_the_map_is_sigmoid_onto_the_box_widened_by_the_margin():
    box = logit_box(-1.0, 1.0, margin=0.01)
    x = jnp.array([[-0.999, 0.0, 0.999]])
    y, _ = unbounded(x, box)
    t = (np.asarray(x, np.float64) + 1) / 2  # position in the box, 0..1
    expected = special.logit(0.01 + 0.98 * t)  # RealNVP's logit(α + (1 − 2α) t)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(box(y)), np.asarray(x), atol=2e-6)


def test_the_log_jacobian_is_the_derivative_of_the_map():
    low, high = jnp.array([0.0, -3.0]), jnp.array([17.0, 2.0])
    box = logit_box(low, high, margin=0.05)
    x = jnp.array([[0.5, -2.9], [16.9, 1.0], [8.0, 0.0]])
    _, log_jacobian = unbounded(x, box)

    derivative = jax.vmap(jax.jacfwd(box.inv))(x)  # (n, 2, 2), diagonal
    expected = jnp.log(jnp.abs(jax.vmap(jnp.diag)(derivative))).sum(axis=1)
    np.testing.assert_allclose(np.asarray(log_jacobian), np.asarray(expected), rtol=1e-5)


def test_an_energys_density_on_the_box_integrates_to_one_and_is_the_logit_normal():
    # a Gaussian energy with exact log Z on the real line is a logit-normal on the box
    mean, std = 0.7, 1.3
    energy = ebm.energies.GaussianEnergy(jnp.array([mean]), jnp.array([[std**2]]))
    box = logit_box(2.0, 5.0, margin=0.0)
    on_box = dist.TransformedDistribution(
        ebm.EnergyDistribution(energy, event_shape=(1,), log_z=energy.log_z), box
    )

    def density(x):
        return float(jnp.exp(on_box.log_prob(jnp.array([[x]]))[0]))

    total, error = integrate.quad(density, 2.0, 5.0, limit=200, epsabs=1e-5, epsrel=1e-5)
    assert abs(total - 1.0) < 1e-4 + error
    x = np.array([2.3, 3.5, 4.9])
    t = (x - 2.0) / 3.0
    logit_normal = stats.norm.logpdf(special.logit(t), mean, std) - np.log(3.0 * t * (1 - t))
    got = np.asarray(on_box.log_prob(jnp.asarray(x[:, None], jnp.float32)))
    np.testing.assert_allclose(got, logit_normal, rtol=1e-5, atol=1e-5)
    # the same number from the pieces a user fits with: y, the energy, and the Jacobian
    y, log_jacobian = unbounded(x[:, None], box)
    pieces = -jax.vmap(energy)(y) - energy.log_z + log_jacobian
    np.testing.assert_allclose(np.asarray(pieces), got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("low", "high", "margin", "message"),
    [
        (1.0, 1.0, 0.01, "low < high"),
        (2.0, 1.0, 0.01, "low < high"),
        (0.0, np.inf, 0.01, "finite"),
        (np.nan, 1.0, 0.01, "finite"),
        (0.0, 1.0, 0.5, "margin"),
        (0.0, 1.0, -0.1, "margin"),
        (0.0, 1.0, "0.1", "margin"),
        (0.0, 1.0, False, "margin"),
        (np.zeros(2), np.ones(3), 0.01, "must broadcast to one shape"),
    ],
)
def test_a_bad_box_is_refused_by_name(low, high, margin, message):
    with pytest.raises(ValueError, match=message):
        logit_box(low, high, margin=margin)


@pytest.mark.parametrize("x", [[[1.5, 0.0]], [[-1.0, 0.0]]])
def test_points_without_an_image_are_refused(x):
    box = logit_box(-1.0, 1.0, margin=0.0)  # the wall itself maps to -inf
    with pytest.raises(ValueError, match="no image"):
        unbounded(np.array(x), box)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_points_are_refused_in_both_directions(bad):
    train = _digit_like_points(3)
    with pytest.raises(ValueError, match="NaN or inf"):
        unbounded(np.where(np.arange(3) == 1, bad, train[:2]), logit_box(-1.0, 1.0))
    coords = ebm.bounded.BoxCoordinates.fit(train, logit_box(-1.0, 1.0))
    z = np.where(np.arange(3) == 2, bad, coords.to_model(train[:2])[0])
    for method in (coords.to_original, coords.log_jacobian):
        with pytest.raises(ValueError, match="non-finite"):
            method(z)
        with pytest.raises(ValueError, match="z"):
            method(np.zeros((2, 4), np.float32))  # 4 coordinates, the box has 3


def test_a_numpy_margin_is_a_number():
    assert logit_box(0.0, 1.0, margin=np.float32(0.01)) is not None


def test_points_that_do_not_fit_the_boxs_bounds_are_refused():
    """A (4, 1) input to a 2-coordinate box broadcast to (4, 2) and its log Jacobian summed
    one coordinate's terms; a (4, 6) input failed inside NumPyro."""
    box = logit_box(np.zeros(2), np.ones(2))
    for width in (1, 6):
        with pytest.raises(ValueError, match="the box's bounds do not fit"):
            unbounded(np.full((4, width), 0.5), box)
    coords = ebm.bounded.BoxCoordinates.fit(_digit_like_points(3), logit_box(-1.0, 1.0))
    with pytest.raises(ValueError, match=r"x"):
        coords.to_model(np.zeros((4, 1), np.float32))  # the scalar box fits any width


def test_unbounded_wants_points_and_a_transform():
    box = logit_box(-1.0, 1.0)
    with pytest.raises(ValueError, match=r"shape \(n, D\)"):
        unbounded(np.zeros(3), box)
    with pytest.raises(TypeError, match="Transform"):
        unbounded(np.zeros((2, 3)), (-1.0, 1.0))


def _digit_like_points(seed, n=400):
    """Points of ``digits()``' kind: integer pixels 0..16 plus uniform noise, scaled to (−1, 1)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 17, (n, 3)) * (rng.random((n, 3)) < 0.6)  # many at the wall
    return ((pixels + rng.random((n, 3))) / 17 * 2 - 1).astype(np.float32)


def test_box_coordinates_standardize_map_back_and_give_each_points_jacobian():
    train = _digit_like_points(0)
    coords = ebm.bounded.BoxCoordinates.fit(train, logit_box(-1.0, 1.0))
    z, log_jacobian = coords.to_model(train)
    # standardized on the real line with the training rows' moments
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=0), 1.0, rtol=1e-5)
    np.testing.assert_allclose(coords.to_original(z), train, atol=2e-6)

    # log |det dz/dx| of the whole map x -> z, by automatic differentiation, point by point
    def to_z(x):
        return (coords.box.inv(x) - coords.mean) / coords.std

    derivative = jax.vmap(jax.jacfwd(to_z))(jnp.asarray(train[:20]))
    expected = np.linalg.slogdet(np.asarray(derivative, np.float64))[1]
    np.testing.assert_allclose(log_jacobian[:20], expected, rtol=1e-5)
    # the same from model coordinates alone (what the command line has for a held-out split)
    np.testing.assert_allclose(coords.log_jacobian(z), log_jacobian, rtol=1e-5, atol=1e-5)


def test_box_coordinates_redequantize_within_each_points_own_pixel_cell():
    train = _digit_like_points(1, n=2000)
    coords = ebm.bounded.BoxCoordinates.fit(
        train, logit_box(-1.0, 1.0), grid=ebm.datasets.DIGITS_GRID
    )
    z, _ = coords.to_model(train)
    moved = coords.to_original(coords.redequantizer()(jax.random.key(0), jnp.asarray(z)))
    cell, fraction = np.divmod((np.asarray(moved, np.float64) + 1) * 17 / 2, 1.0)
    before = np.floor((np.asarray(train, np.float64) + 1) * 17 / 2)
    # the same pixel value (a point within float32 rounding of its cell's edge may cross)
    assert np.mean(cell != before) < 1e-3
    # a new place within the cell, uniform: mean 1/2 and variance 1/12 within 5 standard errors
    fraction = fraction.ravel()
    assert abs(fraction.mean() - 0.5) < 5 * np.sqrt(1 / 12 / fraction.size)
    assert abs(fraction.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / fraction.size)
    assert np.corrcoef(fraction, (np.asarray(train, np.float64).ravel() + 1) * 8.5 % 1)[0, 1] < 0.05


def test_box_coordinates_refuse_a_bad_grid_and_redequantizing_without_one():
    train = _digit_like_points(2)
    with pytest.raises(ValueError, match="grid must be"):
        ebm.bounded.BoxCoordinates.fit(train, logit_box(-1.0, 1.0), grid=(-1.0, 0.0))
    coords = ebm.bounded.BoxCoordinates.fit(train, logit_box(-1.0, 1.0))
    with pytest.raises(ValueError, match="no recording grid"):
        coords.redequantizer()


def test_box_coordinates_refuse_a_constant_coordinate_by_name():
    """Its std is 0: the model coordinates would be NaN and the log-Jacobians +inf."""
    train = _digit_like_points(3, n=20)
    train[:, 0] = 0.25
    train[:, 2] = -1.0
    with pytest.raises(ValueError, match=r"coordinate\(s\) \[0, 2\] of train take a single value"):
        ebm.bounded.BoxCoordinates.fit(train, logit_box(-1.0, 1.0))
