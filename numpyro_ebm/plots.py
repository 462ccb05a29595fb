"""Matplotlib figures of a trained EBM: density vs data, sample grids, training curves.

Every function returns a ``matplotlib.figure.Figure`` drawn on the Agg canvas directly (no
pyplot, no display needed: safe on headless machines and in CI); ``save_figure`` writes one
atomically. The chain plots (trace, rank, energy) are ArviZ's: see
``numpyro_ebm.diagnostics``.

Example:
    >>> import numpy as np
    >>> from numpyro_ebm import plots
    >>> fig = plots.sample_grid(np.random.default_rng(0).random((16, 64)))
    >>> len(fig.axes)
    16
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np

from numpyro_ebm import _io
from numpyro_ebm import logz as _logz

__all__ = ["density_figure", "sample_grid", "save_density_plot", "save_figure", "training_curves"]


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str, *, dpi: int = 100) -> str:
    """Write ``fig`` to ``path`` (format from the suffix) all or nothing
    (``_io.atomic_write``), so the file is never left half-written. Returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    suffix = os.path.splitext(path)[1] or ".png"
    _io.atomic_write(path, lambda f: fig.savefig(f, dpi=dpi, format=suffix[1:]), suffix=suffix)
    return path


def _box(points: np.ndarray, margin: float = 0.15) -> np.ndarray:
    lo, hi = points.min(axis=0), points.max(axis=0)
    pad = margin * (hi - lo)
    return np.stack([lo - pad, hi + pad], axis=1)


def density_figure(
    energy,
    data=None,
    *,
    samples=None,
    toy=None,
    bounds=None,
    log_z: float | None = None,
    num_points: int = 200,
):
    """Learned density next to the data (2-D events only).

    Panels: the true density (with ``toy``) or a histogram of ``data``; the model density
    ``exp(−E − log Z)``; and ``samples`` (e.g. ``FitResult.chains``) if given.

    Args:
        energy: one event ``(2,)`` -> scalar.
        data: ``(n, 2)`` data points (histogram panel; also sets the box when no ``bounds``).
        samples: ``(m, 2)`` model samples.
        toy: a ``datasets.ToyDensity``: show its exact density and use its ``bounds``.
        bounds: ``(2, 2)`` plotting box (default: the toy's, or the data's range plus 15%).
        log_z: normaliser of the model density (default: grid quadrature over the box, so the
            panel shows the density normalised on the box).
        num_points: grid points per axis.
    """
    if bounds is None:
        if toy is not None:
            bounds = toy.bounds
        elif data is not None:
            bounds = _box(np.asarray(data))
        else:
            raise ValueError("density_figure needs bounds, data or toy to choose the box")
    bounds = np.asarray(bounds, np.float64)
    if bounds.shape != (2, 2):
        raise ValueError(f"density_figure draws 2-D densities; bounds must be (2, 2), got {bounds}")
    neg_energy, axes, _ = _logz.grid_log_density(energy, bounds, num_points)
    if log_z is None:
        log_z = _logz.grid(energy, bounds, num_points).value
    model = np.exp(neg_energy - log_z)
    extent = (*bounds[0], *bounds[1])
    panels_wanted = [
        p for p in ("reference", "model", "samples") if p != "samples" or samples is not None
    ]
    if toy is None and data is None:
        panels_wanted.remove("reference")
    fig = _figure((4 * len(panels_wanted), 4.4))
    panels = np.atleast_1d(fig.subplots(1, len(panels_wanted)))
    vmax = model.max()
    for ax, name in zip(panels, panels_wanted, strict=True):
        if name == "reference" and toy is not None:
            mesh = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
            truth = np.exp(np.asarray(toy.log_prob(jax.numpy.asarray(mesh, "float32")), float))
            vmax = max(vmax, truth.max())
            ax.imshow(truth.T, origin="lower", extent=extent, vmin=0, vmax=vmax, cmap="viridis")
            ax.set_title(f"true density ({toy.name})")
        elif name == "reference":
            points = np.asarray(data)
            ax.hist2d(
                points[:, 0], points[:, 1], bins=80, range=bounds, density=True, cmap="viridis"
            )
            ax.set_title(f"data ({points.shape[0]} points)")
        elif name == "model":
            ax.imshow(model.T, origin="lower", extent=extent, vmin=0, vmax=vmax, cmap="viridis")
            ax.set_title("model exp(−E − log Z)")
        else:
            points = np.asarray(samples)[:5000]
            ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.4)
            ax.set_xlim(bounds[0])
            ax.set_ylim(bounds[1])
            ax.set_title(f"model samples ({points.shape[0]})")
        ax.set_aspect("equal")
    return fig


def sample_grid(
    samples, image_shape: tuple[int, int] | None = None, *, num: int = 64, ncols: int = 8
):
    """A grid of samples drawn as grey-scale images (e.g. digits).

    Args:
        samples: ``(n, *event_shape)``; events of shape ``(h, w)`` or of size ``h·w``.
        image_shape: ``(h, w)`` (default: the event shape if 2-D, else a square side).
        num: images shown (at most ``n``).
        ncols: images per row.
    """
    samples = np.asarray(samples)
    size = math.prod(samples.shape[1:])
    if image_shape is None:
        if samples.ndim == 3:
            image_shape = samples.shape[1:]
        else:
            side = math.isqrt(size)
            if side * side != size:
                raise ValueError(
                    f"events of size {size} are not square images; pass image_shape=(h, w)"
                )
            image_shape = (side, side)
    if math.prod(image_shape) != size:
        raise ValueError(f"image_shape {image_shape} does not hold events of size {size}")
    images = samples[:num].reshape(-1, *image_shape)
    nrows = -(-images.shape[0] // ncols)
    fig = _figure((ncols * 0.8, nrows * 0.8))
    axes = np.atleast_1d(fig.subplots(nrows, min(ncols, images.shape[0]))).ravel()
    lo, hi = np.percentile(images, [1, 99])
    for ax in axes:
        ax.set_axis_off()
    for ax, image in zip(axes, images, strict=False):
        ax.imshow(image, cmap="gray_r", vmin=lo, vmax=hi)
    return fig


# (column, title) pairs drawn by training_curves, in panel order; a panel whose columns are
# all NaN (e.g. generator terms of a PCD run) is left out
_CURVES = (
    (("energy_gap",), "energy gap  mean E(data) − mean E(neg)"),
    (("energy_data", "energy_negatives"), "mean energy: data, negatives"),
    (("acceptance_rate",), "acceptance rate"),
    (("step_size",), "sampler step size"),
    (("grad_norm",), "parameter gradient norm"),
    (("langevin_grad_norm",), "mean ‖∇ₓE‖ at the negatives"),
    (("log_z",), "learned log Z"),
    (("heldout_nll",), "held-out NLL (learned log Z)"),
    (("generator_energy", "generator_entropy"), "generator: energy, entropy"),
    (("resampling_ess",), "hybrid resampling ESS"),
)
_LOG_SCALE = ("step_size", "grad_norm", "langevin_grad_norm")


def training_curves(history: dict, *, smooth: int = 25):
    """The training history as a grid of curves (raw in light, running mean on top), against
    the training step (rejected attempts, whose rows are not steps, are left out).

    Args:
        history: ``FitResult.history`` (dict of per-row arrays).
        smooth: running-mean window in steps.
    """
    panels = []
    for columns, title in _CURVES:
        present = [c for c in columns if c in history and np.isfinite(history[c]).any()]
        if present:
            panels.append((present, title))
    ncols = 3
    nrows = max(1, -(-len(panels) // ncols))
    fig = _figure((4.2 * ncols, 2.6 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    rows = len(next(iter(history.values()), ()))
    accepted = np.asarray(history.get("is_finite", np.ones(rows)), bool)
    steps = np.cumsum(accepted)
    for ax, (columns, title) in zip(axes, panels, strict=False):
        for column in columns:
            values = np.asarray(history[column], np.float64)
            keep = np.isfinite(values) & accepted
            if not np.isfinite(values[accepted]).all():  # every few steps (held-out NLL)
                ax.plot(steps[keep], values[keep], ".-", ms=3, lw=0.8, label=column)
                continue
            (line,) = ax.plot(steps[keep], values[keep], lw=0.6, alpha=0.35, label=column)
            if keep.sum() > smooth:
                kernel = np.ones(smooth) / smooth
                ax.plot(
                    steps[keep][smooth - 1 :],
                    np.convolve(values[keep], kernel, mode="valid"),
                    color=line.get_color(),
                    lw=1.4,
                )
        if len(columns) > 1:
            ax.legend(fontsize=7)
        if columns[0] in _LOG_SCALE:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    return fig


def save_density_plot(path: str, energy, toy, samples, *, log_z=None, num_points: int = 300):
    """Write a PNG: true density | learned density | negative-phase samples (atomically).

    Args:
        path: output ``.png`` path.
        energy: trained energy (one event ``(2,)`` -> scalar).
        toy: ``datasets.ToyDensity`` whose exact density is shown for comparison.
        samples: ``(n, 2)`` model samples (e.g. ``FitResult.chains``).
        log_z: normaliser of the learned density (default: grid quadrature on the plotted box).
        num_points: grid resolution per axis.
    """
    fig = density_figure(energy, samples=samples, toy=toy, log_z=log_z, num_points=num_points)
    save_figure(fig, path)
