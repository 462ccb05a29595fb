"""Energies: closed forms against their exact normalisers, neural energies are proper."""

import math
import warnings
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest
from scipy.integrate import quad

import numpyro_ebm as ebm
from numpyro_ebm.energies import (
    DeepEnergy,
    GaussianEnergy,
    GaussianMixtureEnergy,
    MLPEnergy,
    NoiseConditionalEnergy,
    SeparableEnergy,
)


def grid_log_z(energy, half_width, num=801):
    """Trapezoid-free midpoint rule on [-w, w]² (smooth integrands: error far below 1e-4)."""
    edges = np.linspace(-half_width, half_width, num + 1)
    mids = 0.5 * (edges[1:] + edges[:-1])
    xx, yy = np.meshgrid(mids, mids, indexing="ij")
    points = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], -1), jnp.float32)
    neg_e = np.asarray(jax.jit(jax.vmap(lambda x: -energy(x)))(points), np.float64)
    cell = (edges[1] - edges[0]) ** 2
    return float(np.log(np.sum(np.exp(neg_e - neg_e.max())) * cell) + neg_e.max())


def test_gaussian_energy_matches_multivariate_normal():
    mean = jnp.array([0.5, -1.0, 2.0])
    a = jax.random.normal(jax.random.key(0), (3, 3))
    cov = a @ a.T + 0.5 * jnp.eye(3)
    energy = GaussianEnergy(mean, cov)
    x = jax.random.normal(jax.random.key(1), (6, 3))
    log_p = -jax.vmap(energy)(x) - energy.log_z
    np.testing.assert_allclose(log_p, dist.MultivariateNormal(mean, cov).log_prob(x), atol=1e-5)
    np.testing.assert_allclose(energy.covariance, cov, rtol=1e-5, atol=1e-6)
    same = GaussianEnergy(mean, scale_tril=jnp.linalg.cholesky(cov))
    np.testing.assert_allclose(same(x[0]), energy(x[0]), rtol=1e-6)


def test_gaussian_energy_log_z_against_quadrature():
    energy = GaussianEnergy(jnp.array([0.3, -0.2]), jnp.array([[1.0, 0.4], [0.4, 0.5]]))
    assert abs(grid_log_z(energy, 8.0) - float(energy.log_z)) < 1e-4


def test_mixture_log_z_against_quadrature():
    energy = GaussianMixtureEnergy(
        jnp.log(jnp.array([0.5, 2.0, 4.0])),
        jnp.array([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]]),
        jnp.array([[[1.0, 0.3], [0.3, 0.5]], jnp.eye(2) * 0.3, jnp.eye(2)]),
    )
    assert abs(float(energy.log_z) - math.log(6.5)) < 1e-6
    assert abs(grid_log_z(energy, 9.0) - float(energy.log_z)) < 1e-4


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="mean must have shape"):
        GaussianEnergy(jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="covariance must have shape"):
        GaussianEnergy(jnp.zeros(2), jnp.eye(3))
    with pytest.raises(ValueError, match="positive definite"):
        GaussianEnergy(jnp.zeros(2), -jnp.eye(2))
    with pytest.raises(ValueError, match="log_weights must have shape"):
        GaussianMixtureEnergy(jnp.zeros(3), jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="positive integer"):
        MLPEnergy(0, key=jax.random.key(0))
    energy = MLPEnergy(2, hidden=(4,), key=jax.random.key(0))
    with pytest.raises(ValueError, match="ONE event with 2 values"):
        energy(jnp.zeros((5, 2)))


@pytest.mark.parametrize(
    "make",
    [
        lambda k: MLPEnergy(2, hidden=(32, 32), key=k),
        lambda k: DeepEnergy(2, hidden=(32, 32), num_experts=8, key=k),
    ],
)
def test_neural_energies_are_confining(make):
    """Scalar, smooth, and exp(-E) integrable: log Z on growing boxes converges."""
    energy = make(jax.random.key(2))
    x = jax.random.normal(jax.random.key(3), (2,))
    assert energy(x).shape == () and jnp.isfinite(energy(x))
    assert jnp.all(jnp.isfinite(jax.grad(energy)(x)))
    # energy grows without bound in every direction
    directions = jax.random.normal(jax.random.key(4), (16, 2))
    directions /= jnp.linalg.norm(directions, axis=1, keepdims=True)
    far = jax.vmap(energy)(100.0 * directions)
    near = jax.vmap(energy)(10.0 * directions)
    assert bool(jnp.all(far > near))
    # the tails beyond radius 30 carry no mass: log Z over [-30,30]² equals log Z over [-45,45]²
    # (cells of 0.1 on both: the smaller grid's cells are the larger one's middle cells)
    assert abs(grid_log_z(energy, 30.0, 600) - grid_log_z(energy, 45.0, 900)) < 1e-3


def test_mlp_energy_accepts_image_shaped_events():
    energy = MLPEnergy(64, hidden=(16,), key=jax.random.key(5))
    x = jax.random.normal(jax.random.key(6), (8, 8))
    np.testing.assert_allclose(energy(x), energy(x.reshape(64)), rtol=1e-6)


def test_deep_energy_formula():
    energy = DeepEnergy(3, hidden=(8, 8), num_experts=5, sigma=2.0, key=jax.random.key(7))
    energy = jax.tree_util.tree_map(lambda a: a, energy)
    x = jnp.array([0.5, -1.0, 2.0])
    feats = energy.features(x)
    expected = (x @ x) / 4.0 - energy.bias @ x - jnp.sum(jax.nn.softplus(energy.experts(feats)))
    np.testing.assert_allclose(energy(x), expected, rtol=1e-6)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_deep_energy_refuses_a_sigma_that_is_not_a_finite_positive_number(sigma):
    """σ = ∞ drops the quadratic and leaves ``−bᵀx`` unbounded below: no density."""
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        DeepEnergy(2, sigma=sigma, key=jax.random.key(0))


def test_deep_energy_experts_are_bounded_by_default():
    """Bounded (tanh) features bound every expert by softplus(‖wᵢ‖₁ + cᵢ), so
    E(x) ≥ ‖x‖²/σ² − bᵀx − Σᵢ softplus(‖wᵢ‖₁ + cᵢ) everywhere, however steep the weights:
    the quadratic term confines the density near the data, with no well far from it (with
    SiLU features the experts grow linearly and, steep enough, break this bound)."""
    energy = DeepEnergy(2, hidden=(16, 16), num_experts=8, key=jax.random.key(8))
    # steep weights, as after fitting data several σ wide: every weight matrix times 10
    energy = jax.tree_util.tree_map(lambda a: 10.0 * a if a.ndim == 2 else a, energy)
    w, c = energy.experts.weight, energy.experts.bias
    cap = float(jnp.sum(jax.nn.softplus(jnp.sum(jnp.abs(w), axis=1) + c)))
    directions = jax.random.normal(jax.random.key(9), (256, 2))
    directions /= jnp.linalg.norm(directions, axis=1, keepdims=True)
    radii = jnp.array([1.0, 3.0, 10.0, 30.0, 100.0])
    x = (radii[:, None, None] * directions[None]).reshape(-1, 2)
    energies = jax.vmap(energy)(x)
    bound = jnp.sum(x**2, axis=1) / energy.sigma**2 - x @ energy.bias - cap
    assert bool(jnp.all(energies >= bound - 1e-3 * jnp.abs(bound)))
    # hence (b = 0 here) no point beyond radius √(cap + min E) is as low as the lowest energy
    lowest = float(jnp.min(energies))
    far = jnp.linalg.norm(x, axis=1) > math.sqrt(max(cap + lowest, 0.0)) + 1.0
    assert bool(jnp.any(far)) and bool(jnp.all(energies[far] > lowest))


# --- SeparableEnergy: checked against an independent float64 numpy/scipy implementation ---


def coordinate_params(energy, d, **changes):
    """Float64 copies of the d-th 1-D MLP's (weight, bias) per layer; ``changes`` maps
    ``(layer, "weight" | "bias", index)`` to an added amount (for finite differences)."""
    params = [
        [np.asarray(layer.weight[d], np.float64), np.asarray(layer.bias[d], np.float64)]
        for layer in energy.coordinates.layers
    ]
    for (layer, name, index), delta in changes.get("delta", {}).items():
        params[layer][name == "bias"][index] += delta
    return params


def coordinate_energy_ref(t, params, sigma):
    """e_d(t) = t²/(2σ²) + W_L tanh(… tanh(W_1 t + b_1) …) + b_L, in float64."""
    h = np.array([t], np.float64)
    for w, b in params[:-1]:
        h = np.tanh(w @ h + b)
    w, b = params[-1]
    return t * t / (2.0 * sigma**2) + (w @ h + b)[0]


def coordinate_log_z_ref(params, sigma):
    """log ∫ exp(−e_d) by adaptive Gauss-Kronrod (relative accuracy ~1e-12)."""
    value, error = quad(
        lambda t: math.exp(-coordinate_energy_ref(t, params, sigma)),
        -np.inf, np.inf, epsabs=0.0, epsrel=1e-12, limit=1000,
    )  # fmt: skip
    assert error < 1e-9 * value
    return math.log(value)


def scale_weights(energy, factor, layers):
    """The energy with the weight matrices of ``layers`` multiplied by ``factor``."""
    for i in layers:
        energy = eqx.tree_at(
            lambda e, i=i: e.coordinates.layers[i].weight,
            energy,
            factor * energy.coordinates.layers[i].weight,
        )
    return energy


def test_separable_energy_formula_and_shapes():
    energy = SeparableEnergy(5, hidden=(8, 4), sigma=1.5, key=jax.random.key(10))
    x = jax.random.normal(jax.random.key(11), (5,)) * 3.0
    assert energy(x).shape == () and energy.coordinate_energies(x).shape == (5,)
    expected = sum(
        coordinate_energy_ref(float(x[d]), coordinate_params(energy, d), 1.5) for d in range(5)
    )
    np.testing.assert_allclose(float(energy(x)), expected, rtol=1e-5)
    # one event of any shape with 5 values; batches by vmap; passes through jit; errors clear
    np.testing.assert_allclose(energy(x.reshape(5, 1)), energy(x), rtol=1e-6)
    batch = jax.random.normal(jax.random.key(12), (7, 5))
    batched = jax.jit(jax.vmap(lambda e, y: e(y), in_axes=(None, 0)))(energy, batch)
    np.testing.assert_allclose(batched, [energy(y) for y in batch], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ONE event with 5 values"):
        energy(batch)
    # the parameters are the stacked array leaves: one slice per coordinate
    leaves = jax.tree_util.tree_leaves(energy)
    assert len(leaves) == 6 and all(leaf.shape[0] == 5 for leaf in leaves)
    # |f_d| ≤ B_d: far out, the energy is the quadratic term within the bound
    far = jnp.full(5, 50.0)
    gap = energy.coordinate_energies(far) - far**2 / (2 * 1.5**2)
    assert bool(jnp.all(jnp.abs(gap) <= energy.output_bounds + 1e-4))
    for bad, match in [
        (dict(sigma=0.0), "sigma must be"),
        (dict(sigma=True), "sigma must be"),
        (dict(sigma="2"), "sigma must be"),
        (dict(hidden=()), "hidden must"),
        (dict(quadrature_points=4096), "odd integer"),
    ]:
        with pytest.raises(ValueError, match=match):
            SeparableEnergy(2, key=jax.random.key(0), **bad)


@pytest.mark.parametrize(
    "factor, layers",
    [(1.0, ()), (10.0, (0,)), (100.0, (0,))],
    ids=["random", "steep_first_x10", "steep_first_x100"],
)
def test_separable_log_z_matches_scipy_per_coordinate(factor, layers):
    """Every coordinate's log ∫ exp(−e_d) within 1e-6 (relative error of the integral) of
    scipy's adaptive quadrature in float64, for random and steep first-layer weights
    (measured: ≤ 5.3e-7, float32 round-off; the truncated tails are below 1e-12)."""
    energy = scale_weights(SeparableEnergy(6, key=jax.random.key(13)), factor, layers)
    got = np.asarray(energy.coordinate_log_z, np.float64)
    ref = [coordinate_log_z_ref(coordinate_params(energy, d), energy.sigma) for d in range(6)]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(energy.log_z), sum(ref), rtol=0, atol=6e-6)
    assert float(energy.quadrature_error) < 1e-4


def test_separable_log_z_with_every_layer_steep_is_exact_to_float32():
    """Every weight matrix ×10 (output bounds B_d ≈ 18-28, deep narrow wells): the grid still
    resolves the integrand (the float64 trapezoid on the same grid is within 7e-8 of scipy),
    and the float32 result is within the float32 resolution of the energy values themselves,
    a few ε·B_d (measured: up to 4.2e-6 = 1.4 ε·B_d)."""
    energy = scale_weights(SeparableEnergy(6, key=jax.random.key(13)), 10.0, (0, 1, 2))
    got = np.asarray(energy.coordinate_log_z, np.float64)
    ref = [coordinate_log_z_ref(coordinate_params(energy, d), energy.sigma) for d in range(6)]
    resolution = 4 * np.finfo(np.float32).eps * np.asarray(energy.output_bounds, np.float64)
    assert np.all(np.abs(got - ref) <= 1e-6 + resolution)
    assert float(energy.quadrature_error) >= np.sum(np.abs(got - ref))  # conservative here


def test_separable_quadrature_error_flags_a_coarse_grid():
    """Too few points for steep weights: the error estimate is larger than the true error."""
    energy = SeparableEnergy(4, key=jax.random.key(14), quadrature_points=257)
    energy = scale_weights(energy, 30.0, (0,))
    ref = sum(coordinate_log_z_ref(coordinate_params(energy, d), energy.sigma) for d in range(4))
    error = abs(float(energy.log_z) - ref)
    assert error > 1e-5
    assert float(energy.quadrature_error) > error


def test_separable_log_z_matches_the_2d_grid_and_normalises_the_distribution():
    energy = SeparableEnergy(2, key=jax.random.key(15))
    bounds = [[-16.0, 16.0]] * 2
    est = ebm.logz.grid(energy, bounds, 512)
    assert abs(est.value - float(energy.log_z)) <= 3 * est.stderr + 1e-5
    d = ebm.EnergyDistribution(energy, event_shape=(2,))  # picks up energy.log_z
    np.testing.assert_allclose(d.log_z, energy.log_z, rtol=1e-6)
    mass = ebm.logz.grid(lambda x: -d.log_prob(x), bounds, 512)  # log ∫ p = 0
    assert abs(mass.value) <= 3 * mass.stderr + 1e-5


def test_separable_log_z_gradient_matches_finite_differences():
    energy = SeparableEnergy(3, key=jax.random.key(16))
    grads = eqx.filter_grad(lambda e: e.log_z)(energy)
    leaves = jax.tree_util.tree_leaves(grads)
    assert len(leaves) == 6 and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    # ∂ log Z / ∂ b_out,d = −1 exactly (the bias shifts e_d by a constant)
    np.testing.assert_allclose(grads.coordinates.layers[-1].bias, -1.0, rtol=1e-5)
    # a first-layer weight, and the output weight of the coordinate with the largest bound
    # (it sets the grid's half-width L, which must not leak into the gradient)
    d_max = int(jnp.argmax(energy.output_bounds))
    eps = 1e-4
    for d, (layer, name, index), got in [
        (1, (0, "weight", (3, 0)), grads.coordinates.layers[0].weight[1, 3, 0]),
        (d_max, (2, "weight", (0, 5)), grads.coordinates.layers[2].weight[d_max, 0, 5]),
    ]:
        up, down = (
            coordinate_log_z_ref(
                coordinate_params(energy, d, delta={(layer, name, index): s}), energy.sigma
            )
            for s in (eps, -eps)
        )
        np.testing.assert_allclose(float(got), (up - down) / (2 * eps), rtol=1e-3, atol=1e-6)


def test_fit_trains_a_separable_energy():
    """A short ebm.fit on bimodal 4-D data moves the weights; log Z stays exact and finite.
    (The energy's own quadrature log Z: the tracker is off here; it follows a trained
    SeparableEnergy in test_log_z_tracking.py.)"""
    k_sign, k_noise = jax.random.split(jax.random.key(17))
    signs = jax.random.rademacher(k_sign, (256, 4), dtype=jnp.float32)
    data = 1.5 * signs + 0.4 * jax.random.normal(k_noise, (256, 4))
    energy = SeparableEnergy(4, key=jax.random.key(18))
    res = ebm.fit(
        energy, data, key=jax.random.key(19), num_steps=20, num_chains=16, num_mcmc_steps=2,
        batch_size=32, steps_per_call=10, optimizer=optax.adam(1e-2), track_log_z=False,
        progress_bar=False,
    )  # fmt: skip
    assert isinstance(res.energy, SeparableEnergy)
    assert np.all(np.isfinite(res.history["loss"]))
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), res.energy, energy)
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-2
    ref = sum(
        coordinate_log_z_ref(coordinate_params(res.energy, d), res.energy.sigma) for d in range(4)
    )
    assert abs(float(res.energy.log_z) - ref) < 4e-6


@pytest.mark.parametrize(
    ("dim", "widths"),
    [
        (1, (128,) * 3),
        (2, (128,) * 3),
        (3, (256, 256)),
        (64, (256, 256)),
        (65, (512, 512)),
        (256, (1024, 1024)),
        (5000, (1024, 1024)),
    ],
)
def test_default_widths_follow_the_dimension(dim, widths):
    assert ebm.energies.default_hidden(dim) == widths


def test_mlp_energies_take_the_default_widths_of_their_dimension():
    def widths(energy):
        return [layer.weight.shape[0] for layer in energy.net.layers[:-1]]

    key = jax.random.key(0)
    assert widths(ebm.energies.MLPEnergy(2, key=key)) == [128] * 3  # the 2-D toys' widths
    assert widths(ebm.energies.MLPEnergy(64, key=key)) == [256] * 2
    assert widths(ebm.energies.MLPEnergy(64, hidden=(32,), key=key)) == [32]
    assert widths(ebm.energies.NoiseConditionalEnergy(40, 0.1, key=key)) == [256] * 2


@pytest.mark.parametrize("shape", [(), (1,), (2, 2)])
@pytest.mark.parametrize(
    "energy",
    [GaussianEnergy(jnp.zeros(2)), GaussianMixtureEnergy(jnp.zeros(1), jnp.zeros((1, 2)))],
    ids=["gaussian", "mixture"],
)
def test_gaussian_energies_refuse_an_event_of_the_wrong_shape(energy, shape):
    """Broadcasting ``x − μ`` would evaluate a density over another number of values, with the
    2-D ``log Z``: not normalised."""
    with pytest.raises(ValueError, match="ONE event with 2 values"):
        energy(jnp.zeros(shape))
    with pytest.raises(ValueError, match="ONE event with 2 values"):
        ebm.EnergyDistribution(energy, shape)
    x = jnp.array([[0.5, -1.0], [2.0, 0.0]])
    expected = dist.MultivariateNormal(jnp.zeros(2), jnp.eye(2)).log_prob(x)
    np.testing.assert_allclose(-jax.vmap(energy)(x) - energy.log_z, expected, rtol=1e-6)


def test_gaussian_energies_refuse_an_invalid_scale_tril_or_covariance():
    """An upper triangle would be dropped (another covariance), a zero diagonal gives
    ``log Z = −∞``, an asymmetric covariance would be symmetrised: all refused."""
    mean = jnp.zeros(2)
    with pytest.raises(ValueError, match="scale_tril must be lower-triangular"):
        GaussianEnergy(mean, scale_tril=jnp.array([[1.0, 0.5], [0.5, 1.0]]))
    for singular in (jnp.zeros((2, 2)), jnp.array([[1.0, 0.0], [0.3, jnp.nan]])):
        with pytest.raises(ValueError, match="scale_tril must be finite with a non-zero diag"):
            GaussianEnergy(mean, scale_tril=singular)
    with pytest.raises(ValueError, match="covariance must be symmetric"):
        GaussianEnergy(mean, jnp.array([[1.0, 0.9], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="scale_trils must be lower-triangular"):
        GaussianMixtureEnergy(jnp.zeros(1), mean[None], scale_trils=jnp.ones((1, 2, 2)))
    with pytest.raises(ValueError, match="covariances must be symmetric"):
        GaussianMixtureEnergy(jnp.zeros(1), mean[None], jnp.array([[[1.0, 0.5], [0.0, 1.0]]]))
    # float32 round-off in a symmetric covariance is accepted; a negative diagonal is a valid L
    cov = jnp.array([[2.0, 0.6], [0.6 * (1 + 1e-6), 1.0]])
    np.testing.assert_allclose(GaussianEnergy(mean, cov).covariance, cov, rtol=1e-5)
    flipped = GaussianEnergy(mean, scale_tril=jnp.array([[-1.0, 0.0], [0.5, 2.0]]))
    assert abs(float(flipped.log_z) - math.log(2 * math.pi * 2.0)) < 1e-6
    # traced parameters are not checked (and still work)
    log_z = jax.jit(lambda tril: GaussianEnergy(mean, scale_tril=tril).log_z)(2.0 * jnp.eye(2))
    assert abs(float(log_z) - math.log(2 * math.pi * 4.0)) < 1e-5


@pytest.mark.parametrize("confinement", [float("nan"), float("inf"), -0.1, True, "0.1"])
@pytest.mark.parametrize("make", [MLPEnergy, partial(NoiseConditionalEnergy, noise_scale=0.1)])
def test_mlp_energies_refuse_a_confinement_that_is_not_a_finite_number_at_least_0(
    make, confinement
):
    with pytest.raises(ValueError, match="confinement must be a finite number >= 0"):
        make(2, hidden=(4,), key=jax.random.key(0), confinement=confinement)
    assert make(2, hidden=(4,), key=jax.random.key(0), confinement=0).confinement == 0.0


NOISE_CONDITIONAL = partial(NoiseConditionalEnergy, noise_scale=0.1)


@pytest.mark.parametrize("hidden", [(0,), (-3,), (2.5,), (4, 0)])
@pytest.mark.parametrize("make", [MLPEnergy, NOISE_CONDITIONAL, DeepEnergy])
def test_energies_refuse_layer_widths_that_are_not_positive_integers(make, hidden):
    """A width of 0 made an energy that ignores x; -3 and 2.5 failed inside XLA."""
    with pytest.raises(ValueError, match="hidden must name"):
        make(2, hidden=hidden, key=jax.random.key(0))


@pytest.mark.parametrize("num_experts", [0, -1, 2.0])
def test_deep_energy_refuses_a_number_of_experts_that_is_not_a_count(num_experts):
    with pytest.raises(ValueError, match="num_experts must be an integer >= 1"):
        DeepEnergy(2, num_experts=num_experts, key=jax.random.key(0))


def test_a_numpy_integer_dim_is_a_dim_and_at_noise_refuses_a_sigma_not_above_0():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no static-array warning from equinox either
        energy = NOISE_CONDITIONAL(np.int64(2), hidden=(4,), key=jax.random.key(0))
    assert energy.dim == 2 and type(energy.dim) is int
    for sigma in (0.0, -1.0):
        with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
            energy.at_noise(jnp.ones(2), sigma)
    traced = jax.jit(lambda s: energy.at_noise(jnp.ones(2), s))(0.1)  # traced: not checked
    np.testing.assert_allclose(traced, energy(jnp.ones(2)), rtol=1e-6)
