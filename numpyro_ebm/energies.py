"""Energy functions: neural energies (equinox) and closed-form energies with an exact log Z.

Every energy is an equinox module, hence a pytree whose array leaves are its parameters, and is
called on ONE event: ``energy(x) -> scalar`` for ``x`` of shape ``event_shape``. Batches are
handled by the caller (``numpyro_ebm.EnergyDistribution`` vmaps).

Neural energies:

* ``MLPEnergy``: an MLP with a smooth activation (SiLU by default, so Langevin/HMC gradients
  are smooth) plus an optional quadratic confinement ``c‖x‖²``. The MLP grows at most linearly, so
  with ``c > 0`` the density ``exp(−E)`` is integrable on all of ``R^D`` and ``log Z`` exists.
* ``DeepEnergy``: Kim & Bengio's (2016) product-of-experts energy on deep features
  ``E(x) = ‖x‖²/σ² − bᵀx − Σᵢ softplus(wᵢᵀ f(x) + cᵢ)``, without batch normalisation (with it,
  E(x) would depend on the rest of the batch and not be a function of x alone).

Closed-form energies (test targets with a known normaliser):

* ``GaussianEnergy``: ``½ (x−μ)ᵀ Σ⁻¹ (x−μ)`` with ``log Z = ½ D log 2π + log|L|``.
* ``GaussianMixtureEnergy``: ``−log Σₖ exp(aₖ) N(x; μₖ, Σₖ)`` with
  ``log Z = logsumexp(a)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp

from numpyro_ebm.gaussian import log_normalizer

__all__ = ["DeepEnergy", "GaussianEnergy", "GaussianMixtureEnergy", "MLPEnergy"]


def _check_dim(dim) -> int:
    if not (isinstance(dim, int) and dim >= 1):
        raise ValueError(f"dim must be a positive integer (the event size), got {dim!r}")
    return dim


def _flatten_event(x: jax.Array, dim: int) -> jax.Array:
    if x.size != dim:
        raise ValueError(
            f"energy expects ONE event with {dim} values, got an input of shape {x.shape}; "
            "batches are vmapped by EnergyDistribution (or use jax.vmap yourself)"
        )
    return jnp.reshape(x, (dim,))


class MLP(eqx.Module):
    """Plain MLP whose activation is a static field, so the module's leaves are all arrays.

    (``eqx.nn.MLP``/``eqx.nn.Lambda`` keep the activation as a leaf, which plain ``jax.jit``
    rejects; energies here must pass through ``jax.jit``, ``vmap`` and NumPyro unchanged.)
    """

    layers: tuple[eqx.nn.Linear, ...]
    activation: Callable = eqx.field(static=True)
    activate_last: bool = eqx.field(static=True)

    def __init__(self, sizes: Sequence[int], activation: Callable, *, key, activate_last=False):
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(
            eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        )
        self.activation = activation
        self.activate_last = activate_last

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        x = self.layers[-1](x)
        return self.activation(x) if self.activate_last else x


class MLPEnergy(eqx.Module):
    """Multilayer-perceptron energy ``E(x) = mlp(x) + confinement · ‖x‖²``.

    Args:
        dim: number of values in one event (the event is flattened, so images work too).
        hidden: widths of the hidden layers.
        key: PRNG key for the initial weights.
        activation: smooth activation (default SiLU; avoid ReLU: its Hessian is zero and
            its gradient discontinuous, which hurts Langevin and HMC).
        confinement: coefficient ``c ≥ 0`` of the quadratic term. The MLP grows at most
            linearly, so any ``c > 0`` makes ``exp(−E)`` integrable; the default is small
            enough not to matter on data scaled to a few units.

    Example:
        >>> import jax
        >>> energy = MLPEnergy(2, hidden=(32, 32), key=jax.random.key(0))
        >>> energy(jax.numpy.zeros(2)).shape
        ()
    """

    net: MLP
    confinement: float = eqx.field(static=True)
    dim: int = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (128, 128, 128),
        *,
        key: jax.Array,
        activation: Callable = jax.nn.silu,
        confinement: float = 0.01,
    ):
        self.dim = _check_dim(dim)
        if confinement < 0:
            raise ValueError(f"confinement must be >= 0, got {confinement}")
        self.net = MLP((dim, *hidden, 1), activation, key=key)
        self.confinement = float(confinement)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = _flatten_event(x, self.dim)
        return self.net(x)[0] + self.confinement * jnp.sum(x**2)


class DeepEnergy(eqx.Module):
    """Kim & Bengio's deep product-of-experts energy.

    ``E(x) = ‖x‖²/σ² − bᵀx − Σᵢ softplus(wᵢᵀ f(x) + cᵢ)`` where ``f`` is an MLP feature
    extractor and each softplus term is one "expert". No batch normalisation. (Note ``1/σ²``,
    not ``1/(2σ²)``: this follows the paper's formula.)

    The features' default activation is ``tanh``: bounded, so each expert is at most
    ``softplus(‖wᵢ‖₁ + cᵢ)`` and ``E(x) ≥ ‖x‖²/σ² − bᵀx − Σᵢ softplus(‖wᵢ‖₁ + cᵢ)``: the quadratic
    term confines the density within a radius that the trained weights bound. With
    an unbounded activation (e.g. SiLU) the experts grow linearly in ``‖x‖`` with a slope the
    data does not limit: to cancel the quadratic term on data a few σ wide they need steep
    slopes, and beyond the data those slopes can outgrow ``‖x‖²/σ²`` out to a radius
    proportional to slope · σ², a deep well far from the data. Negatives restarted near the data
    every step (``negatives="hybrid"``) never visit it, so training never raises it (measured:
    docs/benchmarks.md, issue 15 item 3b). ``exp(−E)`` is integrable with either activation.

    Args:
        dim: number of values in one event.
        key: PRNG key for the initial weights.
        hidden: widths of the feature MLP ``f`` (its output has width ``hidden[-1]``).
        num_experts: number of softplus experts.
        sigma: scale of the quadratic term.
        activation: smooth activation of ``f`` (default ``tanh``; a bounded one keeps the
            experts bounded, see above).

    Example:
        >>> import jax
        >>> energy = DeepEnergy(2, key=jax.random.key(0))
        >>> float(energy(jax.numpy.zeros(2))) < 0.0   # the experts lower the energy
        True
    """

    features: MLP
    experts: eqx.nn.Linear
    bias: jax.Array
    sigma: float = eqx.field(static=True)
    dim: int = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        *,
        key: jax.Array,
        hidden: Sequence[int] = (128, 128),
        num_experts: int = 64,
        sigma: float = 1.0,
        activation: Callable = jnp.tanh,
    ):
        self.dim = _check_dim(dim)
        if not hidden:
            raise ValueError("hidden must name at least one layer width")
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        k_features, k_experts = jax.random.split(key)
        self.features = MLP((dim, *hidden), activation, key=k_features, activate_last=True)
        self.experts = eqx.nn.Linear(hidden[-1], num_experts, key=k_experts)
        self.bias = jnp.zeros(dim)
        self.sigma = float(sigma)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = _flatten_event(x, self.dim)
        expert_terms = jax.nn.softplus(self.experts(self.features(x)))
        return jnp.sum(x**2) / self.sigma**2 - self.bias @ x - jnp.sum(expert_terms)


def _cholesky(matrix: jax.Array, name: str) -> jax.Array:
    tril = jnp.linalg.cholesky(matrix)
    if not isinstance(tril, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(tril))):
        raise ValueError(f"{name} must be symmetric positive definite")
    return tril


def _mahalanobis(x: jax.Array, mean: jax.Array, scale_tril: jax.Array) -> jax.Array:
    white = jax.scipy.linalg.solve_triangular(scale_tril, x - mean, lower=True)
    return jnp.sum(white**2)


class GaussianEnergy(eqx.Module):
    """Quadratic energy ``E(x) = ½ (x−μ)ᵀ Σ⁻¹ (x−μ)`` with ``Σ = L Lᵀ``; exact ``log Z``.

    ``log Z = ½ D log(2π) + Σ log|Lᵢᵢ|``, so ``exp(−E(x) − log Z)`` is exactly the density of
    ``MultivariateNormal(μ, Σ)``. Parameters (``mean``, ``scale_tril``) are pytree leaves and can
    be trained or differentiated.

    Args:
        mean: ``(D,)`` mean.
        covariance: ``(D, D)`` covariance (give this or ``scale_tril``; default identity).
        scale_tril: ``(D, D)`` lower Cholesky factor of the covariance.

    Example:
        >>> import jax.numpy as jnp
        >>> energy = GaussianEnergy(jnp.zeros(2))
        >>> round(float(energy.log_z), 4)   # log(2π)
        1.8379
    """

    mean: jax.Array
    scale_tril: jax.Array

    def __init__(self, mean, covariance=None, *, scale_tril=None):
        mean = jnp.asarray(mean)
        if mean.ndim != 1:
            raise ValueError(f"mean must have shape (D,), got {mean.shape}")
        if covariance is not None and scale_tril is not None:
            raise ValueError("give either covariance or scale_tril, not both")
        dim = mean.shape[0]
        if scale_tril is None:
            covariance = jnp.eye(dim) if covariance is None else jnp.asarray(covariance)
            if covariance.shape != (dim, dim):
                raise ValueError(f"covariance must have shape {(dim, dim)}, got {covariance.shape}")
            scale_tril = _cholesky(covariance, "covariance")
        scale_tril = jnp.asarray(scale_tril)
        if scale_tril.shape != (dim, dim):
            raise ValueError(f"scale_tril must have shape {(dim, dim)}, got {scale_tril.shape}")
        self.mean = mean
        self.scale_tril = jnp.tril(scale_tril)

    @property
    def covariance(self) -> jax.Array:
        """``(D, D)`` covariance ``L Lᵀ``."""
        return self.scale_tril @ self.scale_tril.T

    @property
    def log_z(self) -> jax.Array:
        """Exact ``log ∫ exp(−E(x)) dx``."""
        return log_normalizer(self.scale_tril)

    def __call__(self, x: jax.Array) -> jax.Array:
        return 0.5 * _mahalanobis(x, self.mean, self.scale_tril)


class GaussianMixtureEnergy(eqx.Module):
    """``E(x) = −log Σₖ exp(aₖ) N(x; μₖ, Σₖ)`` with exact ``log Z = logsumexp(a)``.

    The log-weights ``a`` need not be normalised: their log-sum-exp is the log partition
    function, which makes this a test target with a non-trivial ``log Z``.

    Args:
        log_weights: ``(K,)`` unnormalised log-weights ``aₖ``.
        means: ``(K, D)`` component means.
        covariances: ``(K, D, D)`` component covariances (or give ``scale_trils``; default
            identity).
        scale_trils: ``(K, D, D)`` lower Cholesky factors.

    Example:
        >>> import jax.numpy as jnp
        >>> energy = GaussianMixtureEnergy(jnp.log(jnp.array([1.0, 3.0])),
        ...                                jnp.array([[-2.0, 0.0], [2.0, 0.0]]))
        >>> round(float(energy.log_z), 4)   # log(1 + 3)
        1.3863
    """

    log_weights: jax.Array
    means: jax.Array
    scale_trils: jax.Array

    def __init__(self, log_weights, means, covariances=None, *, scale_trils=None):
        log_weights = jnp.asarray(log_weights)
        means = jnp.asarray(means)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {means.shape}")
        num, dim = means.shape
        if log_weights.shape != (num,):
            raise ValueError(f"log_weights must have shape ({num},), got {log_weights.shape}")
        if covariances is not None and scale_trils is not None:
            raise ValueError("give either covariances or scale_trils, not both")
        if scale_trils is None:
            if covariances is None:
                covariances = jnp.broadcast_to(jnp.eye(dim), (num, dim, dim))
            covariances = jnp.asarray(covariances)
            if covariances.shape != (num, dim, dim):
                raise ValueError(
                    f"covariances must have shape {(num, dim, dim)}, got {covariances.shape}"
                )
            scale_trils = _cholesky(covariances, "covariances")
        scale_trils = jnp.asarray(scale_trils)
        if scale_trils.shape != (num, dim, dim):
            raise ValueError(
                f"scale_trils must have shape {(num, dim, dim)}, got {scale_trils.shape}"
            )
        self.log_weights = log_weights
        self.means = means
        self.scale_trils = jnp.tril(scale_trils)

    @property
    def log_z(self) -> jax.Array:
        """Exact ``log ∫ exp(−E(x)) dx = logsumexp(log_weights)``."""
        return jax.nn.logsumexp(self.log_weights)

    def __call__(self, x: jax.Array) -> jax.Array:
        maha = jax.vmap(_mahalanobis, in_axes=(None, 0, 0))(x, self.means, self.scale_trils)
        log_normal = -0.5 * maha - log_normalizer(self.scale_trils)
        return -jax.nn.logsumexp(self.log_weights + log_normal)
