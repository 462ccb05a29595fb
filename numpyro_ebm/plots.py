"""Matplotlib figures for 2-D energies (headless-safe: uses the Agg canvas directly)."""

from __future__ import annotations

import os
import tempfile

import jax
import numpy as np

from numpyro_ebm import logz as _logz

__all__ = ["save_density_plot"]


def save_density_plot(path: str, energy, toy, samples, *, log_z=None, num_points: int = 300):
    """Write a PNG: true density | learned density | negative-phase samples.

    The file is written to a temporary name and renamed, so it is never left half-written.

    Args:
        path: output ``.png`` path.
        energy: trained energy (one event ``(2,)`` -> scalar).
        toy: ``datasets.ToyDensity`` whose exact density is shown for comparison.
        samples: ``(n, 2)`` model samples (e.g. ``FitResult.chains``).
        log_z: normaliser of the learned density (default: grid quadrature on the plotted box).
        num_points: grid resolution per axis.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bounds = np.asarray(toy.bounds, np.float64)
    neg_energy, axes, _ = _logz.grid_log_density(energy, bounds, num_points)
    if log_z is None:
        log_z = _logz.grid(energy, bounds, num_points).value
    model = np.exp(neg_energy - log_z)
    mesh = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
    truth = np.exp(np.asarray(toy.log_prob(jax.numpy.asarray(mesh, "float32")), np.float64))
    extent = (*bounds[0], *bounds[1])
    fig = Figure(figsize=(12, 4), layout="constrained")
    FigureCanvasAgg(fig)
    panels = fig.subplots(1, 3)
    vmax = max(truth.max(), model.max())
    for ax, image, title in ((panels[0], truth, f"true {toy.name}"), (panels[1], model, "model")):
        ax.imshow(image.T, origin="lower", extent=extent, vmin=0, vmax=vmax, cmap="viridis")
        ax.set_title(title)
    samples = np.asarray(samples)[:5000]
    panels[2].scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.4)
    panels[2].set_xlim(bounds[0])
    panels[2].set_ylim(bounds[1])
    panels[2].set_aspect("equal")
    panels[2].set_title("negative-phase chains")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
