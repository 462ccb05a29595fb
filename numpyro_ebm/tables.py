"""Tables of numbers as densities: columns recorded on a grid are dequantized, then standardized.

A continuous density is only defined for continuous values. Real tables are recorded to a
fixed number of decimals (wine's magnesium in whole mg/l, iris's lengths in 0.1 cm, digits'
pixels as integers): a model fitted to the recorded values themselves can put unbounded
density on them, and its likelihood means nothing. ``TableTransform`` finds each column's
grid spacing ``q`` (its *quantum*: the largest power of ten, ``10⁻⁶ ≤ q ≤ 1``, of which every
training value is a whole multiple; 0 for a column with more decimals) and replaces each
recorded value ``v`` by ``v + u``, ``u ~ Uniform[0, q)`` (uniform dequantization, Theis, van
den Oord & Bethge 2016). Then it standardizes each column with the mean and standard deviation
of the dequantized training column (exact expectations: ``mean + q/2``, ``var + q²/12``).

Units. A model density ``p_model(z)`` on the standardized ``z`` is a density on the
dequantized original values by ``log p(v + u) = log p_model(z) + log_jacobian``. For the
quantized columns it also bounds the probability of the recorded values (Jensen):
``log P(v) ≥ E_u[log p(v + u)] + log_cell_volume``, ``log_cell_volume = Σ log q`` over them.
Reported likelihoods are ``log p(v + u)`` averaged over points, "nats per point in the
original units".

Example:
    >>> import jax, numpy as np
    >>> from numpyro_ebm.tables import TableTransform
    >>> train = np.array([[1.0, 0.25], [2.0, 0.5], [4.0, 0.125], [3.0, 0.75]])
    >>> transform = TableTransform.fit(train)
    >>> transform.quantum.tolist()   # column 0 is whole numbers; column 1 has 3 decimals
    [1.0, 0.001]
    >>> z = transform.to_model(train, key=jax.random.key(0))
    >>> z.shape, z.dtype
    ((4, 2), dtype('float32'))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MAX_DECIMALS",
    "MAX_ROUNDING",
    "TableTransform",
    "column_quanta",
    "column_statistics",
    "default_noise",
    "default_weight_decay",
    "dequantize",
    "dequantized_moments",
    "quantum",
    "redequantizer",
    "snap_to_grid",
    "with_noise",
]

MAX_DECIMALS = 6
"""A column with more decimals than this is continuous (quantum 0)."""

MAX_ROUNDING = 0.1
"""``quantum`` refuses a grid on which its rounding tolerance reaches this fraction of a cell."""

NOISE_SCALE = 0.1
"""``default_noise``'s standard deviation, in standardized coordinates."""

NOISE_BELOW_ROWS_PER_DIMENSION = 100
"""``default_noise`` smooths tables with fewer training rows than this per column (and
``default_weight_decay`` decays the weights on them)."""

WEIGHT_DECAY = 0.1
"""``default_weight_decay``'s AdamW decay."""


def quantum(column: np.ndarray, *, max_decimals: int = MAX_DECIMALS) -> float:
    """The grid spacing of a column: the largest ``10⁻ᵏ`` (``0 ≤ k ≤ max_decimals``) of which
    every value is a whole multiple, or 0 if there is none (a continuous column).

    A value counts as a whole multiple when it is within a few roundings of one in the
    column's own precision (``np.float32(17.99)`` is on the 0.01 grid; float16 and float32
    columns are judged in theirs, float64 and integer columns in float64), and only grids no
    coarser than the column's spread count (values such as 1e-300 and 2e-300 are within
    rounding of 0, not on the grid of 1), nor grids on which a few roundings of the column's
    largest value reach a tenth of a cell (float32 holds 1.2e4 to about 0.001: every value
    would be on the 0.01 grid).

    Example:
        >>> quantum(np.array([5.1, 3.5, 1.4])), quantum(np.array([1.0, 13.0]))
        (0.1, 1.0)
    """
    column = np.asarray(column)
    eps = np.finfo(_precision(column)).eps
    values = column.astype(np.float64)
    with np.errstate(over="ignore"):  # a spread beyond float64 is inf: any grid fits in it
        spread = float(values.max() - values.min()) if values.size else 0.0
    for decimals in range(max_decimals + 1):
        q = 10.0**-decimals
        if 0 < spread < q:
            continue  # values closer than the grid (1e-300 and 2e-300 are not whole numbers)
        with np.errstate(over="ignore"):
            scaled = values * 10.0**decimals
        rounding = 4 * eps * np.maximum(np.abs(scaled), 1.0)
        if np.max(rounding, initial=0.0) >= MAX_ROUNDING:
            break  # finer grids are finer still against the values' precision
        if np.all(np.abs(scaled - np.round(scaled)) <= rounding):
            return float(q)
    return 0.0


def column_quanta(train, *, max_decimals: int = MAX_DECIMALS) -> np.ndarray:
    """``(D,)``: each column's ``quantum`` in the rows ``train`` (n, D), judged in the
    columns' own precision (0 for a continuous column)."""
    return np.array([quantum(c, max_decimals=max_decimals) for c in np.asarray(train).T])


def _precision(array: np.ndarray) -> type:
    """The float type ``array``'s values are judged in: float16 and float32 their own,
    anything else float64."""
    dtype = array.dtype
    return dtype.type if dtype.kind == "f" and dtype.itemsize < 8 else np.float64


def _binary_scale(values: np.ndarray) -> np.ndarray:
    """Powers of two ``2**e`` with ``values / 2**e`` in [1, 2) (1/2 for 0 and inf): dividing
    by them is exact."""
    return np.ldexp(1.0, np.frexp(values)[1] - 1)


def column_statistics(train) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (ddof 0) of each column of ``train`` (n, D), in float64.

    ``train.mean(0)`` and ``train.std(0)`` when every standard deviation is in [1e-100, 1e100]
    (no square comes near over- or underflow); otherwise the same computed on the columns
    divided by powers of two, which is exact: values such as 1e-300 or 1e307, whose squares
    over- or underflow, get the statistics of unit-scale values times their scale. A column
    whose deviations from its mean overflow float64 gets an infinite standard deviation.
    """
    train = np.asarray(train, np.float64)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        mean, std = train.mean(axis=0), train.std(axis=0)
        if np.all((std >= 1e-100) & (std <= 1e100)):
            return mean, std  # the usual case: no square comes near over- or underflow
        scale = _binary_scale(np.max(np.abs(train), axis=0))
        mean = scale * np.mean(train / scale, axis=0)
        deviation = train - mean
        spread = _binary_scale(np.max(np.abs(deviation), axis=0))
        std = spread * np.sqrt(np.mean(np.square(deviation / spread), axis=0))
    return mean, np.where(np.isfinite(std), std, np.inf)


def dequantized_moments(train, quanta) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of the columns of ``train`` (n, D) after uniform
    dequantization by ``quanta`` (D,) (``x + U[0, q)``; 0: a continuous column): the exact
    expectations ``mean + q/2`` and ``sqrt(var + q²/12)``, overflow-safe
    (``column_statistics``)."""
    mean, std = column_statistics(train)
    quanta = np.asarray(quanta, np.float64)
    with np.errstate(over="ignore"):
        return mean + quanta / 2, np.where(quanta > 0, np.hypot(std, quanta / math.sqrt(12)), std)


def dequantize(points, quanta, *, key: jax.Array) -> np.ndarray:
    """``v + u``, ``u ~ Uniform[0, q)`` for each column's quantum ``q``, where ``v`` is the
    grid value of the recorded ``points`` (``snap_to_grid`` in their own precision: float16
    holds 8.3 as 8.296875, whose cell is 8.3's) (float64; a continuous column, ``q = 0``, is
    unchanged). ``key`` is used once."""
    points = snap_to_grid(points, quanta)
    noise = np.asarray(jax.random.uniform(key, points.shape, dtype=np.float32), np.float64)
    return points + noise * np.asarray(quanta, np.float64)


def snap_to_grid(points, quanta, *, rounding=0.0) -> np.ndarray:
    """Dequantized values back on their grid: the cell ``[v, v + q)`` a value falls in gives
    ``v``, rounded to the grid's decimals (continuous columns, ``q = 0``, unchanged).

    A value within a few roundings of a grid point in its own precision (as ``quantum`` judges
    recorded values), plus ``rounding`` (original units, broadcast to ``points``), up to
    ``MAX_ROUNDING`` of a cell, is on it: ``0.3`` stays ``0.3`` although ``0.3 / 0.1 < 3``.
    """
    given = np.asarray(points)
    eps = np.finfo(_precision(given)).eps
    points = given.astype(np.float64)
    rounding = np.broadcast_to(np.asarray(rounding, np.float64), points.shape)
    quanta = np.asarray(quanta, np.float64)
    for j in np.flatnonzero(quanta > 0):
        q = quanta[j]
        cells = points[:, j] / q
        nearest = np.round(cells)
        within = 4 * eps * np.maximum(np.abs(cells), 1.0) + rounding[:, j] / q
        within = np.minimum(within, MAX_ROUNDING)
        whole = np.where(np.abs(cells - nearest) <= within, nearest, np.floor(cells))
        points[:, j] = np.round(whole * q, round(-math.log10(q)))  # 0.30000000000000004
    return points


def redequantizer(to_cells: Callable, from_cells: Callable, columns) -> Callable:
    """``fresh(key, z)``: points in model coordinates ``z`` ``(n, D)``, each dequantized
    entry moved to a new uniform position in its own grid cell (jittable; for ``fit``'s
    ``augment``, which calls it on every training batch).

    Dequantization noise drawn once lets a flexible energy learn the exact noisy points: on
    small tables and digits it digs wells at the training rows within a few hundred steps.
    Drawing it afresh at every step (as flows are trained on images) leaves only the cells to
    learn: on digits the held-out score peaks later and higher (docs/benchmarks.md, "Real
    tables").

    Args:
        to_cells: model coordinates ``(n, D)`` to cell coordinates, where each column's cells
            are the unit intervals ``[k, k + 1)``; elementwise, increasing.
        from_cells: its inverse.
        columns: ``(D,)`` bool, the dequantized columns (the others are returned as given).
    """
    columns = jnp.asarray(columns, bool)

    def fresh(key, z):
        t = to_cells(z)
        moved = from_cells(jnp.floor(t) + jax.random.uniform(key, t.shape, t.dtype))
        return jnp.where(columns, moved, z).astype(z.dtype)

    return fresh


def with_noise(augment: Callable | None, scale: float) -> Callable | None:
    """``augment`` (or nothing) followed by Gaussian noise of standard deviation ``scale`` on
    every coordinate, for ``fit``'s ``augment``: the energy is fitted to the data smoothed by
    that noise, so it cannot dig wells narrower than about ``scale`` at the training rows.
    ``scale`` 0 returns ``augment`` itself.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> noisy = with_noise(None, 0.1)
        >>> noisy(jax.random.key(0), jnp.zeros((4, 3))).shape
        (4, 3)
        >>> with_noise(None, 0.0) is None
        True
    """
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"noise must be a finite number, got {scale!r}")
    if scale < 0:
        raise ValueError(f"noise is a standard deviation and must be >= 0, got {scale}")
    if not scale:
        return augment

    def noisy(key, points):
        k_augment, k_noise = jax.random.split(key)
        if augment is not None:
            points = augment(k_augment, points)
        noise = jax.random.normal(k_noise, points.shape, points.dtype)
        return (points + scale * noise).astype(points.dtype)

    return noisy


def default_noise(num_rows: int, num_columns: int) -> float:
    """The standard deviation of the Gaussian noise (``with_noise``) the command line and
    ``benchmarks/real_data.py`` add to standardized training rows by default:
    ``NOISE_SCALE`` (0.1) with fewer than ``NOISE_BELOW_ROWS_PER_DIMENSION`` (100) training
    rows per column, else 0.

    On so few rows per column a flexible energy digs wells at the training rows: its held-out
    score is then chosen at an early step, and neither AIS nor the tracked ``log Z`` finds
    the wells' mass. Smoothing by 0.1 standard deviations removed them on breast cancer (30-D,
    341 rows: 33.9 to 34.4 nats/point on three seeds against at most 28.3 to 34.8, with a
    converged AIS and a tracked ``log Z`` within 0.6 nats of it) and was neutral or slightly
    better on wine, iris and digits; 0.3 smoothed too much (docs/benchmarks.md, "Gaussian
    noise on the training rows"). The 2-D toys' thousands of rows get none: their narrow modes
    are kept.

    Example:
        >>> default_noise(341, 30), default_noise(50_000, 2)
        (0.1, 0.0)
    """
    return NOISE_SCALE if _few_rows(num_rows, num_columns) else 0.0


def default_weight_decay(num_rows: int, num_columns: int) -> float:
    """The AdamW weight decay (``TrainConfig.weight_decay``) the command line and
    ``benchmarks/real_data.py`` train tables with by default: ``WEIGHT_DECAY`` (0.1) with
    fewer than ``NOISE_BELOW_ROWS_PER_DIMENSION`` (100) training rows per column, where
    ``default_noise`` smooths them too, else 0.

    On so few rows an energy memorises the training rows once it has learnt what generalises;
    the decay holds the weights back. With the noise already on, it scored +0.9 and +1.3 nats
    per image on digits (64-D, 1197 rows; two seeds, paired on the test images), level or
    better on breast cancer, wine and iris (docs/benchmarks.md, "Weight decay on small
    tables"). ``fit`` itself adds none: on data with thousands of rows per column (the 2-D
    toys) there is nothing to hold back, and the decay would pull every parameter, those of
    a ``GaussianEnergy`` too, away from the maximum-likelihood fit.

    Example:
        >>> default_weight_decay(1197, 64), default_weight_decay(50_000, 2)
        (0.1, 0.0)
    """
    return WEIGHT_DECAY if _few_rows(num_rows, num_columns) else 0.0


def _few_rows(num_rows: int, num_columns: int) -> bool:
    if num_rows < 1 or num_columns < 1:
        raise ValueError(f"need rows and columns, got {num_rows} x {num_columns}")
    return num_rows < NOISE_BELOW_ROWS_PER_DIMENSION * num_columns


@dataclasses.dataclass(frozen=True)
class TableTransform:
    """The map from a table's rows ``(n, D)`` (original units) to a model's coordinates.

    Attributes:
        quantum: ``(D,)`` grid spacing of each column (0: continuous, not dequantized).
        mean: ``(D,)`` mean of the dequantized training columns.
        std: ``(D,)`` their standard deviation.
    """

    quantum: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, train, *, max_decimals: int = MAX_DECIMALS) -> TableTransform:
        """The transform of the training rows ``train`` (``(n, D)``, finite; each continuous
        column must vary).

        Raises:
            ValueError: not a finite 2-D table, a continuous column that does not vary, or a
                column whose spread overflows float64.
        """
        given = np.asarray(train)
        train = given.astype(np.float64)
        if train.ndim != 2 or train.shape[0] < 2:
            raise ValueError(f"a table must have shape (n >= 2, D), got {train.shape}")
        if not np.all(np.isfinite(train)):
            raise ValueError("the table holds NaN or infinite values")
        q = column_quanta(given, max_decimals=max_decimals)
        mean, std = dequantized_moments(train, q)
        constant = np.flatnonzero(std == 0)  # a quantized column is at least one cell wide
        if constant.size:
            raise ValueError(
                f"continuous column(s) {constant.tolist()} do not vary in the training rows"
            )
        overflowing = np.flatnonzero(~np.isfinite(std))
        if overflowing.size:
            raise ValueError(
                f"column(s) {overflowing.tolist()} spread beyond float64 (their deviations from "
                "the mean overflow): rescale them"
            )
        return cls(q, mean, std)

    @property
    def quantized(self) -> np.ndarray:
        """``(D,)`` bool: the columns that are dequantized."""
        return self.quantum > 0

    def rows(self, points) -> np.ndarray:
        """``points`` as float64 rows ``(n, D)``, checked (``ValueError`` for another shape
        or a NaN / infinite value)."""
        points = np.asarray(points, np.float64)
        if points.ndim != 2 or points.shape[1] != self.quantum.size:
            raise ValueError(f"rows must have shape (n, {self.quantum.size}), got {points.shape}")
        if not np.all(np.isfinite(points)):
            raise ValueError("the rows hold NaN or infinite values")
        return points

    def dequantize(self, points, *, key: jax.Array) -> np.ndarray:
        """``v + u``, ``u ~ Uniform[0, quantum)`` per quantized entry, ``v`` its grid value
        (``dequantize``; float64)."""
        self.rows(points)  # checked; dequantized in their own precision
        return dequantize(np.asarray(points), self.quantum, key=key)

    def standardize(self, points) -> np.ndarray:
        """Dequantized original values to model coordinates (float32)."""
        return ((self.rows(points) - self.mean) / self.std).astype(np.float32)

    def to_model(self, points, *, key: jax.Array) -> np.ndarray:
        """Recorded rows ``(n, D)`` to model coordinates: dequantize, then standardize."""
        return self.standardize(self.dequantize(points, key=key))

    def to_original(self, z, *, on_grid: bool = False) -> np.ndarray:
        """Model coordinates back to (dequantized) original values, float64; ``on_grid``:
        the quantized columns are put back on their grid (``snap_to_grid``)."""
        z = np.asarray(z)
        points = self.mean + self.std * z.astype(np.float64)
        if not on_grid:
            return points
        # z is known to a few roundings in its own precision (float32 from ``standardize``)
        rounding = 4 * np.finfo(_precision(z)).eps * self.std * np.abs(z)
        return snap_to_grid(points, self.quantum, rounding=rounding)

    def redequantizer(self) -> Callable:
        """``fresh(key, z)``: model coordinates with new dequantization noise in every
        quantized column (``redequantizer``), for ``fit(..., augment=...)``.

        Cell coordinates are ``z · std / q + frac(mean / q)``, with the constants taken in
        float64, so that float32 keeps a cell's position to about ``1e-7`` of the number of
        cells the column spans; a point within that of a cell's edge can land in the
        neighbouring cell, a shift of one grid step for about one entry in ten million.
        """
        quantized = self.quantized
        q = np.where(quantized, self.quantum, 1.0)
        scale = np.where(quantized, self.std / q, 1.0).astype(np.float32)
        offset = np.where(quantized, np.mod(self.mean / q, 1.0), 0.0).astype(np.float32)
        return redequantizer(
            lambda z: z * scale + offset, lambda t: (t - offset) / scale, quantized
        )

    @property
    def log_jacobian(self) -> float:
        """``−Σ log std``: ``log p_original = log p_model + log_jacobian``."""
        return -math.fsum(np.log(self.std))

    @property
    def log_cell_volume(self) -> float:
        """``Σ log quantum`` over the quantized columns (see the module's "Units")."""
        return math.fsum(np.log(self.quantum[self.quantized]))

    def describe(self) -> dict:
        """JSON-able form (``from_description`` reads it back)."""
        return {k: getattr(self, k).tolist() for k in ("quantum", "mean", "std")}

    @classmethod
    def from_description(cls, description: dict) -> TableTransform:
        return cls(*(np.asarray(description[k], np.float64) for k in ("quantum", "mean", "std")))
