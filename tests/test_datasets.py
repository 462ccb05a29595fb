"""Tests for numpyro_ebm.datasets.

Statistical tolerances are k Monte Carlo standard errors, with the standard errors computed
from the exact second and fourth moments of each toy (derived in ``_exact_moments``), so the
checks are as tight as the sample size allows. Seeds are fixed, so the tests are deterministic.
"""

from __future__ import annotations

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special, stats

from numpyro_ebm.datasets import TOY_NAMES, Digits, ToyDensity, digits, digits_to_images, toy

N_SAMPLES = 100_000
K_SE = 5.0  # tolerance in Monte Carlo standard errors for moment checks

G8_RADIUS = 4.0 / math.sqrt(2.0)
G8_STD = 0.5 / math.sqrt(2.0)
RINGS_RADII = np.array([1.0, 2.0, 3.0, 4.0])
RINGS_STD = 0.15
# -H from the literature notes (FFJORD / VERA / "anatomy of MCMC" toys).
LITERATURE_NEG_ENTROPY = {
    "8gaussians": -2.833,
    "checkerboard": -math.log(32.0),
    "rings": -3.533,
    # Disjoint modes: H = H(0.7, 0.3) + log(2 pi e sigma^2), sigma = 1/3 (closed form, not
    # literature).
    "bimodal": 0.7 * math.log(0.7) + 0.3 * math.log(0.3) - 1 - math.log(2 * math.pi / 9),
}
BIMODAL_WEIGHTS = (0.7, 0.3)
BIMODAL_CENTRES = np.array([[-1.2, 0.0], [2.8, 0.0]])
BIMODAL_STD = 1 / 3


@pytest.fixture(scope="module", params=TOY_NAMES)
def toy_and_samples(request):
    t = toy(request.param)
    x = t.sample(jax.random.key(1234), N_SAMPLES)
    return t, np.asarray(x, dtype=np.float64)


def _exact_moments(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``M2[a, b] = E[x_a x_b]`` and ``M4[a, b] = E[x_a^2 x_b^2]`` (all toys have mean 0)."""
    m2 = np.zeros((2, 2))
    m4 = np.zeros((2, 2))
    if name == "8gaussians":
        # Component k: x = c_k + s z, coordinates independent given k.
        angles = np.arange(8) * np.pi / 4
        centres = G8_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
        s2 = G8_STD**2
        for c in centres:
            sec = c**2 + s2  # E[x_a^2 | k]
            fourth = c**4 + 6 * c**2 * s2 + 3 * s2**2  # E[x_a^4 | k]
            m2 += (np.outer(c, c) + s2 * np.eye(2)) / 8
            m4 += (np.outer(sec, sec) * (1 - np.eye(2)) + np.diag(fourth)) / 8
    elif name == "checkerboard":
        # Cell (i, j): coordinates independent uniform on [2i, 2i + 2] x [2j, 2j + 2].
        cells = [(i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0]
        for cell in cells:
            lo = 2.0 * np.asarray(cell, dtype=float)
            hi = lo + 2.0
            first = (lo + hi) / 2
            sec = (lo**2 + lo * hi + hi**2) / 3
            fourth = (hi**5 - lo**5) / (5 * (hi - lo))
            m2 += (np.outer(first, first) * (1 - np.eye(2)) + np.diag(sec)) / len(cells)
            m4 += (np.outer(sec, sec) * (1 - np.eye(2)) + np.diag(fourth)) / len(cells)
    elif name == "rings":
        # x = rho (cos phi, sin phi), phi uniform independent of rho = r_k + s eps.
        s2 = RINGS_STD**2
        e_rho2 = np.mean(RINGS_RADII**2 + s2)
        e_rho4 = np.mean(RINGS_RADII**4 + 6 * RINGS_RADII**2 * s2 + 3 * s2**2)
        m2 = 0.5 * e_rho2 * np.eye(2)  # E[cos^2] = 1/2, E[cos sin] = 0
        m4 = e_rho4 * np.array([[3 / 8, 1 / 8], [1 / 8, 3 / 8]])  # E[cos^4], E[cos^2 sin^2]
    elif name == "bimodal":
        # Component k: x = c_k + s z, coordinates independent given k.
        s2 = BIMODAL_STD**2
        for w, c in zip(BIMODAL_WEIGHTS, BIMODAL_CENTRES, strict=True):
            sec = c**2 + s2
            fourth = c**4 + 6 * c**2 * s2 + 3 * s2**2
            m2 += w * (np.outer(c, c) + s2 * np.eye(2))
            m4 += w * (np.outer(sec, sec) * (1 - np.eye(2)) + np.diag(fourth))
    else:  # pragma: no cover
        raise AssertionError(name)
    return m2, m4


def test_exact_moments_closed_forms():
    m2, _ = _exact_moments("8gaussians")
    np.testing.assert_allclose(m2, (G8_RADIUS**2 / 2 + G8_STD**2) * np.eye(2), atol=1e-12)
    m2, _ = _exact_moments("checkerboard")
    # Each x-marginal is uniform on [-4, 4] (variance 64 / 12); E[xy] = mean of cell centres'
    # products = (9 - 3 + 1 - 3 - 3 + 1 - 3 + 9) / 8 = 1.
    np.testing.assert_allclose(m2, [[16 / 3, 1.0], [1.0, 16 / 3]], atol=1e-12)
    m2, _ = _exact_moments("rings")
    np.testing.assert_allclose(m2, 0.5 * (7.5 + RINGS_STD**2) * np.eye(2), atol=1e-12)


# --------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------


def test_toy_attributes():
    for name in TOY_NAMES:
        t = toy(name)
        assert isinstance(t, ToyDensity)
        assert t.name == name
        assert t.event_shape == (2,)
        assert t.bounds.shape == (2, 2)
        assert toy(name) == t and hash(toy(name)) == hash(t)
    np.testing.assert_array_equal(toy("8gaussians").bounds, [[-5, 5], [-5, 5]])
    np.testing.assert_array_equal(toy("rings").bounds, [[-5, 5], [-5, 5]])
    np.testing.assert_array_equal(toy("checkerboard").bounds, [[-4, 4], [-4, 4]])
    np.testing.assert_array_equal(toy("bimodal").bounds, [[-5, 5], [-5, 5]])


def test_unknown_toy_lists_valid_names():
    with pytest.raises(ValueError, match="8gaussians, checkerboard, rings"):
        toy("moons")


@pytest.mark.parametrize("n", [0, -3])
def test_sample_rejects_non_positive_n(n):
    with pytest.raises(ValueError, match="positive int"):
        toy("rings").sample(jax.random.key(0), n)


@pytest.mark.parametrize("n", [2.0, "10", True, None])
def test_sample_rejects_non_int_n(n):
    with pytest.raises(TypeError, match="positive int"):
        toy("rings").sample(jax.random.key(0), n)


def test_sample_rejects_int_key():
    with pytest.raises(TypeError, match=r"jax\.random\.key"):
        toy("8gaussians").sample(0, 10)


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOY_NAMES)
def test_sample_shape_dtype_and_determinism(name):
    t = toy(name)
    a = t.sample(jax.random.key(0), 257)
    b = t.sample(jax.random.key(0), 257)
    c = t.sample(jax.random.key(1), 257)
    assert isinstance(a, jax.Array)
    assert a.shape == (257, 2) and a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # numpy integer n and legacy uint32 keys work too.
    assert t.sample(jax.random.PRNGKey(0), np.int64(3)).shape == (3, 2)


def test_sample_moments_match_closed_form(toy_and_samples):
    t, x = toy_and_samples
    n = x.shape[0]
    m2, m4 = _exact_moments(t.name)
    # Mean (exactly 0): se = sqrt(Var[x_a] / n) with Var[x_a] = E[x_a^2].
    mean_se = np.sqrt(np.diag(m2) / n)
    np.testing.assert_array_less(np.abs(x.mean(axis=0)), K_SE * mean_se)
    # Second moments about the exact mean 0 (= covariance), se = sqrt(Var[x_a x_b] / n).
    second = x.T @ x / n
    second_se = np.sqrt((m4 - m2**2) / n)
    np.testing.assert_array_less(np.abs(second - m2), K_SE * second_se)


def test_checkerboard_samples_in_support():
    x = np.asarray(toy("checkerboard").sample(jax.random.key(7), 50_000))
    assert np.all((x >= -4) & (x < 4))
    parity = (np.floor(x[:, 0] / 2) + np.floor(x[:, 1] / 2)) % 2
    assert np.all(parity == 0)
    # All 8 cells are hit about equally often: multinomial counts, 5 binomial standard errors.
    cells = np.floor(x / 2).astype(int)
    _, counts = np.unique(cells, axis=0, return_counts=True)
    assert len(counts) == 8
    p = 1 / 8
    assert np.all(np.abs(counts - p * len(x)) < K_SE * np.sqrt(len(x) * p * (1 - p)))


def test_bimodal_samples_match_the_weights():
    # Each side of the midpoint x = 0.8 holds one mode (12 standard deviations apart): the
    # share left of it is binomial(n, 0.7), within 5 binomial standard errors.
    from numpyro_ebm.datasets import BIMODAL_SPLIT

    assert BIMODAL_SPLIT == pytest.approx(BIMODAL_CENTRES[:, 0].mean())
    n = 100_000
    x = np.asarray(toy("bimodal").sample(jax.random.key(3), n))
    left = np.mean(x[:, 0] < BIMODAL_SPLIT)
    assert abs(left - 0.7) < K_SE * math.sqrt(0.7 * 0.3 / n)
    # and each side looks like its Gaussian (mean within 5 se, standard deviation within 2%)
    for side, centre in ((x[:, 0] < BIMODAL_SPLIT, 0), (x[:, 0] >= BIMODAL_SPLIT, 1)):
        pts = x[side]
        se = BIMODAL_STD / math.sqrt(len(pts))
        np.testing.assert_array_less(np.abs(pts.mean(0) - BIMODAL_CENTRES[centre]), K_SE * se)
        np.testing.assert_allclose(pts.std(0), BIMODAL_STD, rtol=0.02)


def test_bimodal_log_prob_mass_per_side():
    # The density integrates to 1 on its box, 0.7 left of the split and 0.3 right of it.
    from numpyro_ebm.datasets import BIMODAL_SPLIT

    lo, hi = toy("bimodal").bounds[0]
    h = 0.02
    grid = _midpoint_grid(lo, hi, h)
    p = np.exp(np.asarray(jax.jit(toy("bimodal").log_prob)(grid), dtype=np.float64)) * h * h
    assert abs(p.sum() - 1.0) < 1e-6
    left = p[grid[..., 0] < BIMODAL_SPLIT].sum()
    assert abs(left - 0.7) < 1e-6


# --------------------------------------------------------------------------------------------
# Log-densities
# --------------------------------------------------------------------------------------------


def _midpoint_grid(lo: float, hi: float, h: float) -> np.ndarray:
    num = round((hi - lo) / h)
    centres = lo + (hi - lo) / num * (np.arange(num) + 0.5)
    xs, ys = np.meshgrid(centres, centres, indexing="ij")
    return np.stack([xs, ys], axis=-1).astype(np.float32)


@pytest.mark.parametrize(
    ("name", "half_width", "h"),
    [
        ("8gaussians", 6.0, 0.02),
        ("rings", 6.0, 0.02),
        ("bimodal", 6.0, 0.02),
        # Cell edges (even integers) are grid edges, so the midpoint rule is exact.
        ("checkerboard", 5.0, 0.1),
    ],
)
def test_log_prob_normalizes(name, half_width, h):
    grid = _midpoint_grid(-half_width, half_width, h)
    lp = np.asarray(jax.jit(toy(name).log_prob)(grid), dtype=np.float64)
    assert lp.shape == grid.shape[:-1]
    assert not np.any(np.isnan(lp))
    total = np.sum(np.exp(lp)) * (2 * half_width / round(2 * half_width / h)) ** 2
    assert abs(total - 1.0) < 1e-3


def test_log_prob_of_samples_is_finite(toy_and_samples):
    t, x = toy_and_samples
    lp = np.asarray(t.log_prob(x.astype(np.float32)))
    assert lp.shape == (x.shape[0],)
    assert np.all(np.isfinite(lp))


def test_log_prob_batch_shapes_and_dtypes():
    for name in TOY_NAMES:
        t = toy(name)
        x = jnp.zeros((3, 4, 2)) + 0.5
        assert t.log_prob(x).shape == (3, 4)
        assert t.log_prob(jnp.array([0.5, 0.5])).shape == ()
        assert t.log_prob(x.astype(jnp.float16)).dtype == jnp.float16
        assert t.log_prob(np.array([[1, 1]])).dtype == jnp.float32  # ints are cast
        with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
            t.log_prob(jnp.zeros((4, 3)))


def test_8gaussians_log_prob_matches_scipy():
    x = np.random.default_rng(0).uniform(-5, 5, size=(200, 2))
    angles = np.arange(8) * np.pi / 4
    centres = G8_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    comp = np.stack([stats.multivariate_normal(c, G8_STD**2).logpdf(x) for c in centres], -1)
    expected = special.logsumexp(comp, axis=-1) - np.log(8)
    got = np.asarray(toy("8gaussians").log_prob(x.astype(np.float32)))
    # float32 evaluation: relative error ~1e-6 of the (up to ~200 nats) log-density.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_rings_log_prob_matches_scipy():
    x = np.random.default_rng(1).uniform(-5, 5, size=(200, 2))
    rho = np.linalg.norm(x, axis=-1, keepdims=True)
    radial = stats.norm.pdf(rho, RINGS_RADII, RINGS_STD) + stats.norm.pdf(
        -rho, RINGS_RADII, RINGS_STD
    )
    with np.errstate(divide="ignore"):
        expected = np.log(radial.mean(-1) / (2 * np.pi * rho[:, 0]))
    got = np.asarray(toy("rings").log_prob(x.astype(np.float32)))
    finite = np.isfinite(expected)  # scipy underflows to 0 far from the rings
    assert finite.sum() > 100
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-5, atol=1e-4)
    assert np.all(got[~finite] < -600)


def test_rings_log_prob_safe_at_origin():
    t = toy("rings")
    origin = jnp.zeros(2)
    assert jnp.isfinite(t.log_prob(origin))
    grad = jax.grad(t.log_prob)(origin)
    assert jnp.all(jnp.isfinite(grad))
    assert jnp.all(jnp.isfinite(jax.grad(t.log_prob)(jnp.array([1e-30, 0.0]))))


def test_8gaussians_log_prob_gradient_finite_far_away():
    g = jax.grad(toy("8gaussians").log_prob)(jnp.array([300.0, -200.0]))
    assert jnp.all(jnp.isfinite(g))


def test_checkerboard_log_prob_values():
    t = toy("checkerboard")
    inside = jnp.array([[0.5, 0.5], [-3.5, -3.5], [-4.0, -4.0], [2.0, 2.0], [3.9, -0.1]])
    outside = jnp.array(
        [[0.5, -0.5], [-0.5, 0.5], [4.0, 0.0], [0.0, 4.0], [4.5, 0.5], [-4.1, -3.0], [9, 9]]
    )
    np.testing.assert_allclose(t.log_prob(inside), -np.log(32.0), rtol=1e-6)
    assert np.all(np.asarray(t.log_prob(outside)) == -np.inf)


# --------------------------------------------------------------------------------------------
# Entropy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOY_NAMES)
def test_entropy_matches_literature(name):
    h = toy(name).entropy()
    assert isinstance(h, float)
    assert abs(-h - LITERATURE_NEG_ENTROPY[name]) < 2e-3


def test_checkerboard_entropy_exact():
    assert toy("checkerboard").entropy() == math.log(32.0)


def test_rings_entropy_matches_radial_quadrature():
    # Independent 1-D computation: H = -int_0^inf q(r) log(q(r) / (2 pi r)) dr with q the
    # density of |x|.
    def q(r):
        return np.mean(
            stats.norm.pdf(r, RINGS_RADII, RINGS_STD) + stats.norm.pdf(-r, RINGS_RADII, RINGS_STD)
        )

    def integrand(r):
        qr = q(r)
        return -qr * np.log(qr / (2 * np.pi * r)) if qr > 0 else 0.0

    h, err = integrate.quad(integrand, 0.0, 6.0, points=[1, 2, 3, 4], limit=200)
    assert err < 1e-7
    assert abs(toy("rings").entropy() - h) < 1e-6


@pytest.mark.parametrize("name", ["8gaussians", "rings"])
def test_entropy_matches_float32_grid_of_log_prob(name):
    # The numpy float64 quadrature and the public float32 log_prob describe the same density.
    half_width, h = 6.0, 0.02
    grid = _midpoint_grid(-half_width, half_width, h)
    lp = np.asarray(toy(name).log_prob(grid), dtype=np.float64)
    ent = -np.sum(np.exp(lp) * lp) * h * h
    assert abs(ent - toy(name).entropy()) < 1e-4


def test_entropy_matches_monte_carlo(toy_and_samples):
    t, x = toy_and_samples
    lp = np.asarray(t.log_prob(x.astype(np.float32)), dtype=np.float64)
    se = lp.std(ddof=1) / np.sqrt(len(lp))
    # Checkerboard: log_prob is constant, se = 0; allow float32 rounding of -log 32.
    assert abs(-lp.mean() - t.entropy()) <= max(4.0 * se, 1e-6)


# --------------------------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------------------------

N_DIGITS = 1797


@pytest.fixture(scope="module")
def digits_data() -> Digits:
    return digits()


@pytest.fixture(scope="module")
def sklearn_digits():
    from sklearn.datasets import load_digits

    return load_digits()


def test_digits_shapes_and_types(digits_data):
    d = digits_data
    assert d.train.shape == (1497, 64) and d.test.shape == (300, 64)
    assert len(d.train) + len(d.test) == N_DIGITS
    assert d.train.dtype == np.float32 and d.test.dtype == np.float32
    assert d.train_labels.shape == (1497,) and d.test_labels.shape == (300,)
    assert np.issubdtype(d.train_labels.dtype, np.integer)
    assert set(np.unique(d.train_labels)) == set(range(10))
    assert d.image_shape == (8, 8)


def test_digits_values_in_open_interval(digits_data):
    for x in (digits_data.train, digits_data.test):
        assert np.all(x > -1.0) and np.all(x < 1.0)


def test_digits_deterministic(digits_data):
    again = digits()
    for a, b in zip(digits_data, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = digits(seed=1)
    assert not np.array_equal(other.train_index, digits_data.train_index)


def test_digits_split_disjoint_and_labels_consistent(digits_data, sklearn_digits):
    d = digits_data
    assert not set(d.train_index.tolist()) & set(d.test_index.tolist())
    np.testing.assert_array_equal(
        np.sort(np.concatenate([d.train_index, d.test_index])), np.arange(N_DIGITS)
    )
    np.testing.assert_array_equal(d.train_labels, sklearn_digits.target[d.train_index])
    np.testing.assert_array_equal(d.test_labels, sklearn_digits.target[d.test_index])


def test_digits_documented_pipeline(digits_data, sklearn_digits):
    rng = np.random.default_rng(0)
    x_raw = sklearn_digits.data + rng.random(sklearn_digits.data.shape)
    x = x_raw / 17 * 2 - 1
    perm = rng.permutation(N_DIGITS)
    np.testing.assert_array_equal(digits_data.test_index, perm[:300])
    # float32 rounding of values in (-1, 1): absolute error <= 2^-24.
    np.testing.assert_allclose(digits_data.train, x[perm[300:]], rtol=0, atol=1e-7)


def test_digits_log_jacobian(digits_data):
    assert digits_data.log_jacobian == pytest.approx(64 * math.log(2 / 17), rel=1e-12)
    # Consistency with a change of variables: the uniform density on [0, 17)^64 maps to the
    # uniform density on [-1, 1)^64.
    log_p_raw, log_p_scaled = -64 * math.log(17), -64 * math.log(2)
    assert log_p_raw == pytest.approx(log_p_scaled + digits_data.log_jacobian, rel=1e-12)


def test_digits_round_trip_to_images(digits_data, sklearn_digits):
    d = digits_data
    images = d.to_images(d.train)
    assert images.shape == (1497, 8, 8)
    pixels = sklearn_digits.images[d.train_index]
    u = images - pixels  # dequantization noise, U[0, 1)
    # float32 storage: |error| <= 17 / 2 * 2^-24 < 1e-6.
    assert np.all(u > -1e-6) and np.all(u < 1 + 1e-6)
    # The noise is uniform: mean 1/2 within 5 standard errors (Var U = 1/12).
    assert abs(u.mean() - 0.5) < K_SE * math.sqrt(1 / 12 / u.size)
    quantized = d.to_images(d.train, quantize=True)
    np.testing.assert_array_equal(quantized, pixels)
    assert quantized.min() >= 0 and quantized.max() <= 16
    np.testing.assert_array_equal(digits_to_images(d.test[0]), d.to_images(d.test[:1])[0])
    with pytest.raises(ValueError, match="64"):
        digits_to_images(np.zeros((2, 63)))


@pytest.mark.parametrize("seed", [68, 86])
def test_digits_recovers_the_pixels_where_float32_rounds_onto_a_cells_edge(seed, sklearn_digits):
    """Versions 68 and 86 of the data set each held a value that float32 rounded into the
    next pixel's cell."""
    d = digits(seed=seed)
    for x, index in ((d.train, d.train_index), (d.test, d.test_index)):
        np.testing.assert_array_equal(d.to_images(x, quantize=True), sklearn_digits.images[index])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1e-6, math.nan, math.inf])
def test_digits_rejects_bad_test_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        digits(test_fraction=fraction)


def test_digits_custom_fraction():
    d = digits(test_fraction=0.5)
    assert len(d.test) == round(N_DIGITS / 2) and len(d.train) + len(d.test) == N_DIGITS


def test_digits_missing_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        digits()
