"""Data on a bounded box: a logit map onto the real line, and back, as a NumPyro transform.

Dequantized pixels (``datasets.digits``: every pixel in ``(−1, 1)``), proportions and other
values recorded inside known bounds have a density with hard walls, and much of their mass
sits at the walls (most digit pixels are 0). A smooth energy cannot make a wall: it spills
mass past it, which costs likelihood at every point near it. Mapping each coordinate through
a logit first (as flow papers do for images: Dinh et al. 2017, Papamakarios et al. 2017)
turns the walls into tails, which a smooth energy models well; the density on the box follows
by the change of variables. On digits this moves the default EBM from 17.5 to 41.0 nats per
image (docs/benchmarks.md, "Digits off the box").

``logit_box(low, high)`` is the map ``y ↦ x = loc + scale · sigmoid(y)`` onto the box widened
by ``margin`` of its width on each side (so values at the walls map to finite ``y``), built
from NumPyro's ``SigmoidTransform`` and ``AffineTransform``: train on ``unbounded(x, box)``,
and ``numpyro.distributions.TransformedDistribution(EnergyDistribution(...), box)`` is the
model's density on the box, Jacobian included.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import numpyro.distributions as dist
    >>> import numpyro_ebm as ebm
    >>> box = ebm.bounded.logit_box(-1.0, 1.0)
    >>> x = jnp.array([[-0.999, 0.2], [0.5, 0.999]])
    >>> y, log_jacobian = ebm.bounded.unbounded(x, box)
    >>> energy = ebm.energies.GaussianEnergy(jnp.zeros(2))
    >>> on_box = dist.TransformedDistribution(
    ...     ebm.EnergyDistribution(energy, event_shape=(2,)), box)
    >>> bool(jnp.allclose(on_box.log_prob(x), -jax.vmap(energy)(y) - energy.log_z + log_jacobian))
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import transforms

from numpyro_ebm import tables
from numpyro_ebm.validation import is_real, validate_data

__all__ = ["DEFAULT_MARGIN", "BoxCoordinates", "logit_box", "unbounded"]

DEFAULT_MARGIN = 0.01
"""Share of the box's width added on each side before the logit (RealNVP's ``α``: ``0.05``
for 8-bit images; digits' walls map to ``y = ±4.6`` with ``0.01``)."""


def logit_box(low, high, *, margin: float = DEFAULT_MARGIN) -> transforms.Transform:
    """The map ``y ∈ ℝ ↦ x ∈ (low − m, high + m)``, ``m = margin (high − low) / (1 − 2 margin)``,
    elementwise: ``x = low − m + (high − low + 2m) sigmoid(y)``.

    Args:
        low: the box's lower bounds, a scalar or an array broadcasting to one event
            (``low < high`` everywhere, finite).
        high: its upper bounds, likewise.
        margin: share of the width added on each side, in ``[0, 0.5)``; 0 maps the walls
            themselves to ``±∞``, so data on a wall (a pixel of exactly 0) has no image.

    Returns:
        A NumPyro ``Transform`` (``ComposeTransform`` of ``SigmoidTransform`` and
        ``AffineTransform``) from the real line onto the widened box: ``box.inv(x)`` is the
        unbounded value, ``box.log_abs_det_jacobian(y, x)`` the elementwise ``log |dx/dy|``.

    Raises:
        ValueError: bounds not finite or not ``low < high``, or ``margin`` outside ``[0, 0.5)``.
    """
    low_np, high_np = np.asarray(low, np.float64), np.asarray(high, np.float64)
    try:
        np.broadcast_shapes(low_np.shape, high_np.shape)
    except ValueError:
        raise ValueError(
            f"low (shape {low_np.shape}) and high (shape {high_np.shape}) must broadcast to "
            "one shape: one bound of each kind per coordinate, or a scalar for all"
        ) from None
    if not (np.all(np.isfinite(low_np)) and np.all(np.isfinite(high_np))):
        raise ValueError(f"the box's bounds must be finite, got low={low!r}, high={high!r}")
    if not np.all(low_np < high_np):
        raise ValueError(f"the box needs low < high everywhere, got low={low!r}, high={high!r}")
    if not (is_real(margin) and 0.0 <= margin < 0.5):
        raise ValueError(f"margin must be a number in [0, 0.5), got {margin!r}")
    width = (high_np - low_np) / (1.0 - 2.0 * margin)
    loc = low_np - margin * width
    return transforms.ComposeTransform(
        [
            transforms.SigmoidTransform(),
            transforms.AffineTransform(
                jnp.asarray(loc, jnp.float32), jnp.asarray(width, jnp.float32)
            ),
        ]
    )


def unbounded(x, box: transforms.Transform) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``(y, log_jacobian)``: points ``x`` ``(n, D)`` on the box mapped to the real line by
    ``box.inv``, and per point ``Σ log |dy/dx|`` ``(n,)``, so that
    ``log p_box(x) = log p(y) + log_jacobian`` for a density ``p`` fitted to ``y``.

    Raises:
        TypeError: ``box`` is not a NumPyro ``Transform``.
        ValueError: ``x`` not ``(n, ...)`` points (whose shape the box's bounds broadcast
            to), not finite, or not inside the (widened) box: it has no image.
    """
    if not isinstance(box, transforms.Transform):
        raise TypeError(f"box must be a numpyro Transform (logit_box), got {type(box).__name__}")
    x = jnp.asarray(x, jnp.float32)
    if x.ndim < 2:
        raise ValueError(f"x must be points of shape (n, D), got shape {x.shape}")
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError("x holds NaN or inf values: drop or fill those points first")
    try:
        shape = jax.eval_shape(box.inv, x).shape
    except (TypeError, ValueError):  # bounds that do not broadcast against the points
        shape = None
    if shape != x.shape:
        raise ValueError(
            f"x holds points of shape {x.shape[1:]}, which the box's bounds do not fit (they "
            "must broadcast to one point's shape, not widen it): pass points with one value "
            "per bound"
        )
    y = box.inv(x)
    if not bool(jnp.all(jnp.isfinite(y))):
        raise ValueError(
            "points outside the box (or on a wall with margin 0) have no image on the real "
            "line: widen the box or give a margin > 0"
        )
    log_jacobian = -box.log_abs_det_jacobian(y, x)
    return y, log_jacobian.reshape(x.shape[0], -1).sum(axis=1)


@dataclasses.dataclass(frozen=True, eq=False)
class BoxCoordinates:
    """A model's coordinates for data in a box: the logit map, then standardization,
    ``z = (box.inv(x) − mean) / std``, with the map back and the Jacobian of each point.

    Attributes:
        box: the map from the real line onto the box (``logit_box``).
        mean, std: ``(D,)`` float32 moments of the training rows on the real line.
        grid: ``(start, step)`` of a recording grid shared by every coordinate (digits:
            ``(−1, 2/17)``, pixel ``k`` is the cell ``[start + k step, start + (k + 1) step)``),
            or None for continuous values; ``redequantizer`` moves points within its cells.

    Example:
        >>> import numpy as np, numpyro_ebm as ebm
        >>> x = np.array([[-0.9, 0.1], [0.3, 0.8], [0.5, -0.2]], np.float32)
        >>> coords = ebm.bounded.BoxCoordinates.fit(x, ebm.bounded.logit_box(-1.0, 1.0))
        >>> z, log_jacobian = coords.to_model(x)
        >>> bool(np.allclose(coords.to_original(z), x, atol=1e-5)), log_jacobian.shape
        (True, (3,))
    """

    box: transforms.Transform
    mean: np.ndarray
    std: np.ndarray
    grid: tuple[float, float] | None = None

    @classmethod
    def fit(cls, train, box: transforms.Transform, *, grid=None) -> BoxCoordinates:
        """The coordinates whose moments are the training rows' ``train`` ``(n, D)``.

        Raises:
            ValueError: a coordinate takes one value on every row (its std would be 0)."""
        y = unbounded(train, box)[0]
        if grid is not None and not (len(grid) == 2 and float(grid[1]) > 0):
            raise ValueError(f"grid must be (start, step) with step > 0, got {grid!r}")
        constant = np.flatnonzero(np.asarray(jnp.all(y == y[:1], axis=0)).ravel())
        if constant.size:
            raise ValueError(
                f"coordinate(s) {constant.tolist()} of train take a single value: they cannot "
                "be standardized (std 0); drop them or add the data's own noise"
            )
        return cls(box, np.asarray(jnp.mean(y, axis=0)), np.asarray(jnp.std(y, axis=0)), grid)

    def to_model(self, x) -> tuple[np.ndarray, np.ndarray]:
        """``(z, log_jacobian)``: float32 model coordinates of ``x`` ``(n, D)`` and per point
        ``log |dz/dx|`` (float64), so that ``log p_box(x) = log p_model(z) + log_jacobian``.

        Raises:
            ValueError: ``x`` is not a finite ``(n, D)`` array inside the box."""
        y, log_jacobian = unbounded(validate_data(x, (len(self.mean),), name="x"), self.box)
        z = np.asarray((y - self.mean) / self.std, np.float32)
        return z, np.asarray(log_jacobian, np.float64) - np.log(self.std).sum()

    def to_original(self, z) -> np.ndarray:
        """Model coordinates ``(n, D)`` back onto the box.

        Raises:
            ValueError: ``z`` is not a finite floating-point ``(n, D)`` array."""
        return np.asarray(self.box(self._checked(z) * self.std + self.mean))

    def log_jacobian(self, z) -> np.ndarray:
        """Per point ``log |dz/dx|`` at model coordinates ``z`` ``(n, D)`` (``to_model``'s).

        Raises:
            ValueError: ``z`` is not a finite floating-point ``(n, D)`` array."""
        y = self._checked(z).astype(jnp.float32) * self.std + self.mean
        per_coordinate = -self.box.log_abs_det_jacobian(y, self.box(y))
        total = np.asarray(per_coordinate, np.float64).reshape(y.shape[0], -1).sum(axis=1)
        return total - np.log(self.std).sum()

    def _checked(self, z) -> jnp.ndarray:
        return validate_data(z, (len(self.mean),), name="z (model coordinates)")

    def redequantizer(self) -> Callable:
        """``fresh(key, z)``: model coordinates with every coordinate moved to a new uniform
        place in its own cell of ``grid`` (``tables.redequantizer``), for ``fit``'s
        ``augment``."""
        if self.grid is None:
            raise ValueError("these coordinates have no recording grid to redequantize on")
        start, cells = float(self.grid[0]), float(np.float32(1.0 / float(self.grid[1])))
        mean, std = jnp.asarray(self.mean, jnp.float32), jnp.asarray(self.std, jnp.float32)

        def to_cells(z):
            return (self.box(z * std + mean) - start) * cells

        def from_cells(t):
            return (self.box.inv(t / cells + start) - mean) / std

        return tables.redequantizer(to_cells, from_cells, np.ones(len(self.mean), bool))
