"""Benchmark data sets with known ground truth.

Two kinds of data live here.

**2-D toy densities** (``toy``), whose exact normalized log-density, exact sampler and
differential entropy are all available. Because the plane is two-dimensional, the normalizer of
a model fitted to these data can be computed by quadrature, so test log-likelihoods and
``KL(data || model) = E_data[log p_data - log p_model]`` are exact up to Monte Carlo error, and
``-H(p_data)`` is the best achievable expected test log-likelihood. The definitions follow the
FFJORD toy suite (Grathwohl et al., 2019; the same generators are reused by VERA, Grathwohl
et al., 2021) and, for the rings, "On the Anatomy of MCMC-based Maximum Likelihood Learning of
Energy-Based Models" (Nijkamp et al., 2020):

* ``"8gaussians"`` - an equal mixture of 8 isotropic Gaussians with standard deviation
  ``0.5 / sqrt(2)`` whose centres lie on the circle of radius ``4 / sqrt(2)`` at angles
  ``k * pi / 4``, ``k = 0..7`` (FFJORD draws ``4 * centre + 0.5 * noise`` and divides by
  ``1.414``). ``-H = -2.8316`` nats (usually quoted as about -2.833).
* ``"checkerboard"`` - uniform on the 8 "black" squares of side 2 of a 4x4 checkerboard
  covering ``[-4, 4]^2``: with ``i = floor(x / 2)`` and ``j = floor(y / 2)`` in ``{-2..1}``,
  a point is in the support iff ``i + j`` is even. The density is ``1 / 32`` there, so
  ``-H = -log 32 ~= -3.4657`` nats exactly.
* ``"rings"`` - an equal mixture of 4 rings: radius ``r = r_k + 0.15 * eps`` with
  ``r_k in {1, 2, 3, 4}`` and ``eps ~ N(0, 1)``, angle uniform on ``[0, 2 pi)``.
  ``-H = -3.5345`` nats (usually quoted as about -3.533).
* ``"bimodal"`` - two isotropic Gaussians with standard deviation ``1 / 3`` and UNEQUAL
  weights, ``0.7`` at ``(-1.2, 0)`` and ``0.3`` at ``(2.8, 0)`` (mean 0; centres 4 = 12
  standard deviations apart, so the modes share no mass: the split at ``x = 0.8`` leaves
  ~1e-9 of either on the wrong side). Samplers that cannot cross between the modes cannot
  measure their weights (issue 17). ``-H = -1.2515`` nats (``H`` = the weights' entropy +
  a Gaussian's, up to ~1e-8).

**Tables** (``table``): scikit-learn's offline tables of measurements, in their original
units with a fixed train/validation/test split: ``"wine"`` (178 × 13), ``"breast_cancer"``
(569 × 30), ``"iris"`` (150 × 4, lengths recorded to 0.1 cm: the smallest, and the one where
memorising the training rows is easiest). ``numpyro_ebm.tables.TableTransform`` turns them
into a model's coordinates.

**Digits** (``digits``): the 1797 8x8 handwritten digits of the UCI optical recognition
data set, as shipped with scikit-learn (no download); the integer pixels in ``{0..16}``
uniformly dequantized and scaled to ``(-1, 1)`` (``Digits.log_jacobian`` links the units).

Example:
    >>> import jax
    >>> from numpyro_ebm.datasets import toy
    >>> rings = toy("rings")
    >>> x = rings.sample(jax.random.key(0), 1000)
    >>> x.shape, rings.log_prob(x).shape
    ((1000, 2), (1000,))
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp as _jax_logsumexp

__all__ = [
    "BIMODAL_SPLIT",
    "DIGITS_GRID",
    "TABLE_NAMES",
    "TOY_NAMES",
    "Digits",
    "Table",
    "ToyDensity",
    "digits",
    "digits_to_images",
    "table",
    "toy",
]

TOY_NAMES: tuple[str, ...] = ("8gaussians", "checkerboard", "rings", "bimodal")
"""Names accepted by ``toy``."""

# --- 8gaussians -----------------------------------------------------------------------------
_G8_RADIUS = 4.0 / math.sqrt(2.0)
_G8_STD = 0.5 / math.sqrt(2.0)
_G8_ANGLES = np.arange(8) * (np.pi / 4.0)
_G8_CENTRES = _G8_RADIUS * np.stack([np.cos(_G8_ANGLES), np.sin(_G8_ANGLES)], axis=-1)  # (8, 2)

# --- checkerboard ---------------------------------------------------------------------------
_CB_HALF_WIDTH = 4.0
_CB_SIDE = 2.0
# Lower-left corners (in cell units) of the 8 cells (i, j), i, j in {-2..1}, i + j even.
_CB_CELLS = np.array([(i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0])
_CB_LOG_DENSITY = -math.log(32.0)

# --- rings ----------------------------------------------------------------------------------
_RINGS_RADII = np.array([1.0, 2.0, 3.0, 4.0])
_RINGS_STD = 0.15

# --- bimodal --------------------------------------------------------------------------------
_BI_WEIGHTS = np.array([0.7, 0.3])
_BI_CENTRES = np.array([[-1.2, 0.0], [2.8, 0.0]])  # weighted mean 0
_BI_STD = 1.0 / 3.0
BIMODAL_SPLIT = 0.8
"""``x``-coordinate of the midpoint between ``"bimodal"``'s centres: mode 0 (weight 0.7) lies
left of it, mode 1 (weight 0.3) right."""

_BOUNDS = {
    "8gaussians": ((-5.0, 5.0), (-5.0, 5.0)),
    "checkerboard": ((-4.0, 4.0), (-4.0, 4.0)),
    "rings": ((-5.0, 5.0), (-5.0, 5.0)),
    "bimodal": ((-5.0, 5.0), (-5.0, 5.0)),
}
# Half-width of the square [-L, L]^2 used for the entropy quadrature: the mass outside it is
# below 1e-12 (> 7 standard deviations beyond the outermost centre / ring).
_QUAD_HALF_WIDTH = {"8gaussians": 6.0, "rings": 5.5, "bimodal": 6.0}
_QUAD_STEP = 0.02


# ============================================================================================
# Log-densities, written once for NumPy (float64 quadrature) and jax.numpy (the public API).
# ============================================================================================


def _log_prob_8gaussians(x: Any, xp: Any, logsumexp: Callable) -> Any:
    centres = xp.asarray(_G8_CENTRES, dtype=x.dtype)
    sq_dist = xp.sum((x[..., None, :] - centres) ** 2, axis=-1)  # (..., 8)
    log_norm = math.log(8.0) + math.log(2.0 * math.pi * _G8_STD**2)
    return logsumexp(-0.5 * sq_dist / _G8_STD**2, axis=-1) - log_norm


def _log_prob_checkerboard(x: Any, xp: Any, logsumexp: Callable) -> Any:
    del logsumexp
    u, v = x[..., 0], x[..., 1]
    in_box = (u >= -_CB_HALF_WIDTH) & (u < _CB_HALF_WIDTH)
    in_box = in_box & (v >= -_CB_HALF_WIDTH) & (v < _CB_HALF_WIDTH)
    parity = xp.mod(xp.floor(u / _CB_SIDE) + xp.floor(v / _CB_SIDE), 2.0)
    inside = in_box & (parity == 0)
    return xp.where(
        inside, xp.asarray(_CB_LOG_DENSITY, dtype=x.dtype), xp.asarray(-np.inf, dtype=x.dtype)
    )


def _log_prob_rings(x: Any, xp: Any, logsumexp: Callable) -> Any:
    # |x| clipped away from 0: the origin has measure zero and the density vanishes there
    # (~1e-10), the clip only keeps log(|x|) and its gradient finite.
    sq_norm = xp.sum(x**2, axis=-1)
    rho = xp.sqrt(xp.maximum(sq_norm, xp.finfo(x.dtype).tiny))[..., None]
    radii = xp.asarray(_RINGS_RADII, dtype=x.dtype)
    # Radial density of r = r_k + std * eps folded onto |x|: N(|x|; r_k, std) + N(-|x|; r_k, std).
    z = xp.concatenate([(rho - radii) / _RINGS_STD, (rho + radii) / _RINGS_STD], axis=-1)
    log_radial = logsumexp(-0.5 * z**2, axis=-1) - (
        math.log(len(_RINGS_RADII)) + 0.5 * math.log(2.0 * math.pi) + math.log(_RINGS_STD)
    )
    # Change to Cartesian coordinates: dx = |x| d|x| dphi, angle uniform on [0, 2 pi).
    return log_radial - math.log(2.0 * math.pi) - xp.log(rho[..., 0])


def _log_prob_bimodal(x: Any, xp: Any, logsumexp: Callable) -> Any:
    centres = xp.asarray(_BI_CENTRES, dtype=x.dtype)
    sq_dist = xp.sum((x[..., None, :] - centres) ** 2, axis=-1)  # (..., 2)
    log_weights = xp.asarray(np.log(_BI_WEIGHTS), dtype=x.dtype)
    log_norm = math.log(2.0 * math.pi * _BI_STD**2)
    return logsumexp(log_weights - 0.5 * sq_dist / _BI_STD**2, axis=-1) - log_norm


_LOG_PROBS: dict[str, Callable[[Any, Any, Callable], Any]] = {
    "8gaussians": _log_prob_8gaussians,
    "checkerboard": _log_prob_checkerboard,
    "rings": _log_prob_rings,
    "bimodal": _log_prob_bimodal,
}


def _np_logsumexp(a: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.log(np.sum(np.exp(a - m), axis=axis)) + np.squeeze(m, axis=axis)


# ============================================================================================
# Samplers (JAX).
# ============================================================================================


def _sample_8gaussians(key: jax.Array, n: int) -> jax.Array:
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.randint(k_comp, (n,), 0, 8)
    centres = jnp.asarray(_G8_CENTRES, dtype=jnp.float32)
    return centres[comp] + _G8_STD * jax.random.normal(k_noise, (n, 2), dtype=jnp.float32)


def _sample_checkerboard(key: jax.Array, n: int) -> jax.Array:
    k_cell, k_unif = jax.random.split(key)
    cell = jax.random.randint(k_cell, (n,), 0, len(_CB_CELLS))
    corners = jnp.asarray(_CB_CELLS, dtype=jnp.float32)[cell]
    # u in [0, 1) on a 2^-23 grid, so corner + u is exact in float32 and stays in the cell.
    u = jax.random.uniform(k_unif, (n, 2), dtype=jnp.float32)
    return _CB_SIDE * (corners + u)


def _sample_rings(key: jax.Array, n: int) -> jax.Array:
    k_comp, k_angle, k_noise = jax.random.split(key, 3)
    comp = jax.random.randint(k_comp, (n,), 0, len(_RINGS_RADII))
    angle = jax.random.uniform(k_angle, (n,), dtype=jnp.float32, maxval=2.0 * jnp.pi)
    eps = jax.random.normal(k_noise, (n,), dtype=jnp.float32)
    radius = jnp.asarray(_RINGS_RADII, dtype=jnp.float32)[comp] + _RINGS_STD * eps
    return radius[:, None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=-1)


def _sample_bimodal(key: jax.Array, n: int) -> jax.Array:
    k_comp, k_noise = jax.random.split(key)
    comp = (jax.random.uniform(k_comp, (n,)) >= _BI_WEIGHTS[0]).astype(jnp.int32)
    centres = jnp.asarray(_BI_CENTRES, dtype=jnp.float32)
    return centres[comp] + _BI_STD * jax.random.normal(k_noise, (n, 2), dtype=jnp.float32)


_SAMPLERS: dict[str, Callable[[jax.Array, int], jax.Array]] = {
    "8gaussians": _sample_8gaussians,
    "checkerboard": _sample_checkerboard,
    "rings": _sample_rings,
    "bimodal": _sample_bimodal,
}


# ============================================================================================
# Entropy by quadrature.
# ============================================================================================


@functools.cache
def _entropy(name: str) -> float:
    """Differential entropy (nats) of a toy, exact or by float64 midpoint quadrature."""
    if name == "checkerboard":
        return math.log(32.0)
    log_prob = _LOG_PROBS[name]
    half_width = _QUAD_HALF_WIDTH[name]
    num = round(2.0 * half_width / _QUAD_STEP)
    h = 2.0 * half_width / num
    # Cell midpoints; the origin lies on a cell edge, never on a node.
    grid = -half_width + h * (np.arange(num) + 0.5)
    total = 0.0
    chunk = 200
    for start in range(0, num, chunk):
        xs, ys = np.meshgrid(grid[start : start + chunk], grid, indexing="ij")
        lp = log_prob(np.stack([xs, ys], axis=-1), np, _np_logsumexp)
        # The midpoint rule is spectrally accurate for these smooth, rapidly decaying
        # integrands: h = 0.02 agrees with h = 0.01 (and, for the rings, with 1-D radial
        # adaptive quadrature) to ~1e-11 nats.
        total += float(np.sum(np.exp(lp) * lp))
    return -total * h * h


# ============================================================================================
# Public toy API.
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class ToyDensity:
    """A 2-D toy density with exact sampler, log-density and entropy.

    Create instances with ``toy``. Instances are immutable and hashable (so they can be
    passed as static arguments to ``jax.jit``).

    Attributes:
        name: One of :data:`TOY_NAMES`.
    """

    name: str

    def __post_init__(self) -> None:
        if self.name not in TOY_NAMES:
            raise ValueError(
                f"unknown toy density {self.name!r}; valid names are {', '.join(TOY_NAMES)}."
            )

    @property
    def bounds(self) -> np.ndarray:
        """Plotting / quadrature box ``[[xlo, xhi], [ylo, yhi]]``, shape ``(2, 2)``.

        ``[-5, 5]^2`` for ``"8gaussians"``, ``"rings"`` and ``"bimodal"`` (holding all but ~1e-9
        of the mass),
        ``[-4, 4]^2`` (the exact support) for ``"checkerboard"``. A fresh array each call.
        """
        return np.array(_BOUNDS[self.name], dtype=np.float64)

    @property
    def event_shape(self) -> tuple[int, ...]:
        """Shape of one point: ``(2,)``."""
        return (2,)

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        """Draw exact i.i.d. samples.

        Args:
            key: A JAX PRNG key, e.g. ``jax.random.key(0)``. The same key gives the same
                samples.
            n: Number of samples, a positive int (static under ``jax.jit``).

        Returns:
            Samples of shape ``(n, 2)`` and dtype float32.

        Raises:
            TypeError: If ``key`` is a plain integer or ``n`` is not an int.
            ValueError: If ``n`` is not positive.

        Example:
            >>> import jax
            >>> toy("8gaussians").sample(jax.random.key(0), 5).shape
            (5, 2)
        """
        if isinstance(key, (int, np.integer)):
            raise TypeError(
                f"key must be a JAX PRNG key, got the integer {key!r}; use jax.random.key({key!r})."
            )
        if isinstance(n, (bool, np.bool_)) or not _is_index(n):
            raise TypeError(f"n must be a positive int, got {n!r} (type {type(n).__name__}).")
        n = operator.index(n)
        if n <= 0:
            raise ValueError(f"n must be a positive int, got {n}.")
        return _SAMPLERS[self.name](key, n)

    def log_prob(self, x: Any) -> jax.Array:
        """Exact normalized log-density.

        Pure ``jax.numpy``, so it can be jitted, vmapped and differentiated.

        Args:
            x: Points of shape ``(..., 2)``. Non-float input is cast to float32; float inputs
                keep their dtype.

        Returns:
            Log-density of shape ``(...)``. ``-inf`` outside the support of
            ``"checkerboard"``.

        Raises:
            ValueError: If the last dimension of ``x`` is not 2.

        Example:
            >>> import jax.numpy as jnp
            >>> float(toy("checkerboard").log_prob(jnp.array([0.5, 0.5])))  # -log 32
            -3.465735912322998
        """
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(jnp.float32)
        if x.ndim < 1 or x.shape[-1] != 2:
            raise ValueError(f"x must have shape (..., 2), got shape {x.shape}.")
        return _LOG_PROBS[self.name](x, jnp, _jax_logsumexp)

    def entropy(self) -> float:
        """Differential entropy ``H = -E[log p(x)]`` in nats.

        Exact (``log 32``) for ``"checkerboard"``; for the others computed once (and cached)
        by float64 midpoint quadrature of ``-p log p`` on a 0.02-spaced grid over a box
        holding all but ~1e-12 of the mass (accurate to ~1e-9): ``-H = -2.83158`` for
        ``"8gaussians"``, ``-3.53453`` for ``"rings"`` and ``-1.25152`` for ``"bimodal"``.

        Returns:
            The entropy as a Python float. ``-entropy()`` is the best achievable expected
            test log-likelihood of any model.

        Example:
            >>> round(-toy("8gaussians").entropy(), 4)
            -2.8316
        """
        return _entropy(self.name)


def toy(name: str) -> ToyDensity:
    """Look up a 2-D toy density by name.

    Args:
        name: One of ``"8gaussians"``, ``"checkerboard"``, ``"rings"``, ``"bimodal"`` (see the
            module docstring for the definitions).

    Returns:
        The ``ToyDensity``.

    Raises:
        ValueError: If ``name`` is unknown; the message lists the valid names.

    Example:
        >>> t = toy("checkerboard")
        >>> t.bounds.tolist()
        [[-4.0, 4.0], [-4.0, 4.0]]
    """
    return ToyDensity(name)


# ============================================================================================
# Digits.
# ============================================================================================

_DIGITS_LEVELS = 17  # integer pixels 0..16, dequantized to [0, 17)
_DIGITS_NUM_PIXELS = 64
_DIGITS_IMAGE_SHAPE = (8, 8)
DIGITS_GRID = (-1.0, 2.0 / _DIGITS_LEVELS)
"""``(start, step)`` of pixel ``k``'s cell ``[start + k step, ...)`` in ``digits()``' space."""


class Digits(NamedTuple):
    """The dequantized, scaled 8x8 digits with a fixed train/test split.

    Attributes:
        train: Training vectors, shape ``(n_train, 64)``, float32, values in ``(-1, 1)``.
        test: Test vectors, shape ``(n_test, 64)``, float32, values in ``(-1, 1)``.
        train_labels: Digit classes ``0..9`` of ``train``, shape ``(n_train,)``, int64.
        test_labels: Digit classes ``0..9`` of ``test``, shape ``(n_test,)``, int64.
        image_shape: ``(8, 8)``.
        log_jacobian: ``64 * log(2 / 17)``, the log-Jacobian of the map from dequantized
            pixels to scaled vectors: ``log p_raw(x_raw) = log p_scaled(x) + log_jacobian``
            for ``x_raw = pixel + u`` in ``[0, 17)^64``.
        train_index: Row indices of ``train`` in ``sklearn.datasets.load_digits()``.
        test_index: Row indices of ``test`` in ``sklearn.datasets.load_digits()``.
    """

    train: np.ndarray
    test: np.ndarray
    train_labels: np.ndarray
    test_labels: np.ndarray
    image_shape: tuple[int, int]
    log_jacobian: float
    train_index: np.ndarray
    test_index: np.ndarray

    def to_images(self, x: Any, *, quantize: bool = False) -> np.ndarray:
        """Map scaled vectors back to pixel images; see ``digits_to_images``."""
        return digits_to_images(x, quantize=quantize)


def digits_to_images(x: Any, *, quantize: bool = False) -> np.ndarray:
    """Map scaled digit vectors back to 8x8 pixel intensities.

    Inverts the scaling of ``digits``: ``pixel + u = (x + 1) / 2 * 17``.

    Args:
        x: Scaled vectors, shape ``(n, 64)`` or ``(64,)`` (NumPy or concrete JAX array).
        quantize: If ``False`` (default), return the dequantized intensities ``pixel + u``
            (in ``[0, 17)`` for data; model samples may fall slightly outside). If ``True``,
            return ``floor`` of them clipped to the integer pixel range ``[0, 16]``, which
            recovers the original scikit-learn images exactly for data vectors.

    Returns:
        Images of shape ``(n, 8, 8)`` (or ``(8, 8)``), same float dtype as ``x`` (float32 for
        non-float input).

    Raises:
        ValueError: If the last dimension of ``x`` is not 64.

    Example:
        >>> import numpy as np
        >>> digits_to_images(np.full((2, 64), -1.0), quantize=True).shape
        (2, 8, 8)
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    if x.ndim < 1 or x.shape[-1] != _DIGITS_NUM_PIXELS:
        raise ValueError(
            f"x must have shape (n, {_DIGITS_NUM_PIXELS}) or ({_DIGITS_NUM_PIXELS},), "
            f"got shape {x.shape}."
        )
    pixels = (x + 1.0) * (_DIGITS_LEVELS / 2.0)
    if quantize:
        pixels = np.clip(np.floor(pixels), 0.0, _DIGITS_LEVELS - 1.0)
    return pixels.reshape(*x.shape[:-1], *_DIGITS_IMAGE_SHAPE)


def digits(*, test_fraction: float = 1 / 6, seed: int = 0) -> Digits:
    """Load the scikit-learn 8x8 digits, dequantized and scaled to ``(-1, 1)``.

    Pipeline (1797 images of 64 integer pixels in ``{0..16}``):

    1. ``rng = numpy.random.default_rng(seed)``.
    2. Uniform dequantization: ``x_raw = pixel + u`` with ``u = rng.random((1797, 64))``,
       so ``x_raw`` lies in ``[0, 17)``.
    3. Scaling: ``x = x_raw / 17 * 2 - 1``, cast to float32, and kept strictly inside
       ``(-1, 1)`` and inside each pixel's own cell (a value that float32 rounds onto a
       cell's edge is moved by an ulp: ``digits_to_images`` recovers the pixels exactly).
    4. Split: ``perm = rng.permutation(1797)``; the first ``round(1797 * test_fraction)``
       indices form the test set (300 images by default), the rest the training set (1497).

    ``seed`` is the *version* of the data set, not a source of run-to-run randomness: it is
    fixed by default, so the dequantization noise and the split are identical across calls,
    machines and runs, and results computed on ``digits()`` are comparable. Change it only to
    study the sensitivity to the dequantization noise or the split.

    Args:
        test_fraction: Fraction of the images held out for testing, in ``(0, 1)``.
        seed: Data-set version (seed of the dequantization noise and of the split).

    Returns:
        A ``Digits`` tuple ``(train, test, train_labels, test_labels, image_shape,
        log_jacobian, train_index, test_index)`` of NumPy arrays (float32 vectors of shape
        ``(n, 64)``, int64 labels and indices).

    Raises:
        ImportError: If scikit-learn is not installed.
        ValueError: If ``test_fraction`` leaves an empty train or test set.

    Example:
        >>> d = digits()
        >>> d.train.shape, d.test.shape
        ((1497, 64), (300, 64))
        >>> d.to_images(d.test[:2], quantize=True).shape
        (2, 8, 8)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "numpyro_ebm.datasets.digits needs scikit-learn (it ships the digits data); "
            "install it with `pip install scikit-learn`."
        ) from err
    bunch = load_digits()
    pixels = np.asarray(bunch.data, dtype=np.float64)  # (1797, 64), integers 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    n = pixels.shape[0]
    n_test = round(n * test_fraction) if 0.0 < test_fraction < 1.0 else 0
    if not 0 < n_test < n:
        raise ValueError(
            f"test_fraction must leave at least one image in each split of the {n} images, "
            f"got test_fraction={test_fraction!r} ({n_test} test images)."
        )

    rng = np.random.default_rng(seed)
    x_raw = pixels + rng.random(pixels.shape)
    x = (x_raw / _DIGITS_LEVELS * 2.0 - 1.0).astype(np.float32)
    lo, hi = np.nextafter(np.float32([-1.0, 1.0]), np.float32(0.0))
    x = np.clip(x, lo, hi)
    for _ in range(4):  # float32 may round a value onto its cell's edge: move it an ulp in
        cell = np.floor((x + np.float32(1.0)) * np.float32(_DIGITS_LEVELS / 2.0))
        x = np.nextafter(x, np.select([cell < pixels, cell > pixels], [hi, lo], x))
    perm = rng.permutation(n)
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    return Digits(
        train=x[train_idx],
        test=x[test_idx],
        train_labels=labels[train_idx],
        test_labels=labels[test_idx],
        image_shape=_DIGITS_IMAGE_SHAPE,
        log_jacobian=_DIGITS_NUM_PIXELS * math.log(2.0 / _DIGITS_LEVELS),
        train_index=train_idx,
        test_index=test_idx,
    )


# ============================================================================================
# Tables.
# ============================================================================================

TABLE_NAMES: tuple[str, ...] = ("wine", "breast_cancer", "iris")
"""Names accepted by ``table``."""


class Table(NamedTuple):
    """A table's rows in original units, split once for all.

    Attributes:
        train, validation, test: ``(n, D)`` float64 rows (60% / 20% / 20%).
        columns: the ``D`` column names.
    """

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    columns: tuple[str, ...]


def table(name: str, *, seed: int = 0) -> Table:
    """One of scikit-learn's offline tables (``TABLE_NAMES``), split 60/20/20 at random.

    ``seed`` is the data set's version (of the split), fixed by default like ``digits``'s:
    results on ``table(name)`` are comparable across runs and machines.

    Example:
        >>> wine = table("wine")
        >>> wine.train.shape, wine.validation.shape, wine.test.shape
        ((106, 13), (36, 13), (36, 13))
    """
    from sklearn import datasets as sk

    loaders = {"wine": sk.load_wine, "breast_cancer": sk.load_breast_cancer, "iris": sk.load_iris}
    if name not in loaders:
        raise ValueError(f"unknown table {name!r}; choose one of {TABLE_NAMES}")
    bunch = loaders[name]()
    rows = np.asarray(bunch.data, np.float64)
    order = np.random.default_rng(seed).permutation(len(rows))
    test, validation, train = np.split(order, np.array([1, 2]) * round(0.2 * len(rows)))
    return Table(rows[train], rows[validation], rows[test], tuple(bunch.feature_names))


def _is_index(x: Any) -> bool:
    try:
        operator.index(x)
    except TypeError:
        return False
    return True
