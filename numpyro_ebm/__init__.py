"""numpyro_ebm: energy-based models as first-class NumPyro distributions.

``p(x) = exp(−E(x)) / Z`` with an energy ``E`` given as a callable pytree, trained by maximum
likelihood with BlackJAX chains supplying the model expectation.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import numpyro_ebm as ebm
    >>> energy = ebm.energies.GaussianEnergy(jnp.zeros(2))
    >>> d = ebm.EnergyDistribution(energy, event_shape=(2,), log_z=energy.log_z)
"""

from numpyro_ebm import (
    bounded,
    datasets,
    diagnostics,
    energies,
    evaluate,
    generator,
    logz,
    negatives,
    plots,
    samplers,
    tables,
    training,
    validation,
)
from numpyro_ebm.distribution import EnergyDistribution
from numpyro_ebm.training import (
    CheckpointError,
    FitResult,
    MaximumLikelihood,
    TrainConfig,
    TrainingDivergedError,
    fit,
    load,
)

__all__ = [
    "CheckpointError",
    "EnergyDistribution",
    "FitResult",
    "MaximumLikelihood",
    "TrainConfig",
    "TrainingDivergedError",
    "bounded",
    "datasets",
    "diagnostics",
    "energies",
    "evaluate",
    "fit",
    "generator",
    "load",
    "logz",
    "negatives",
    "plots",
    "samplers",
    "tables",
    "training",
    "validation",
]
__version__ = "0.1.0.dev0"
