"""Where the negative phase's samples come from: one interface, several implementations.

The maximum-likelihood gradient needs samples from the current model in every training step.
A negative sampler supplies them (``base.NegativeSampler``: ``init`` and ``sample``, pure and
jittable). The implementations:

* ``Persistent`` (``"persistent"``, the default; PCD, Tieleman 2008): chains carried across
  parameter updates, a share restarted at the data each step.
* ``Replay`` (``"replay"``; Du & Mordatch 2019): chains started from a bank of past negatives.
* ``ShortRun`` (``"short_run"``; Nijkamp et al. 2019): fresh chains from a Gaussian fitted to
  the data each step. Good samples, NOT a valid density.
* ``GeneratorNegatives`` (``"generator"``; Kim & Bengio 2016): a generator's samples, no MCMC.
* ``Hybrid`` (``"hybrid"``): generator samples resampled towards the model and refined by MCMC.
* ``ContrastiveDivergence`` (``"contrastive_divergence"``): one chain from each batch row;
  the default for conditional energies.
* ``ParallelTempering`` (``"parallel_tempering"``): ladders of tempered replicas between the
  data's Gaussian and the model, so chains cross between separated modes (also conditional).
* ``NoNegatives`` (``"none"``): nothing, for the objectives that need no negatives (score
  matching; the default there).

``fit(negatives="persistent")`` and the other names map to default-configured objects
(``build``); a configured object is accepted too.
"""

from __future__ import annotations

from numpyro_ebm.gaussian import GaussianBase, fit_base
from numpyro_ebm.negatives.base import (
    ChainRecord,
    NegativeInfo,
    NegativeSampler,
    Target,
    describe,
    describe_value,
)
from numpyro_ebm.negatives.contrastive import ContrastiveDivergence
from numpyro_ebm.negatives.generator import GeneratorNegatives, GeneratorState, default_generator
from numpyro_ebm.negatives.hybrid import Hybrid
from numpyro_ebm.negatives.none import NoNegatives
from numpyro_ebm.negatives.persistent import Persistent
from numpyro_ebm.negatives.replay import Replay
from numpyro_ebm.negatives.short_run import ShortRun
from numpyro_ebm.negatives.tempering import ParallelTempering, TemperingState, tempering_summary

__all__ = [
    "KINDS",
    "ChainRecord",
    "ContrastiveDivergence",
    "GaussianBase",
    "GeneratorNegatives",
    "GeneratorState",
    "Hybrid",
    "NegativeInfo",
    "NegativeSampler",
    "NoNegatives",
    "ParallelTempering",
    "Persistent",
    "Replay",
    "ShortRun",
    "Target",
    "TemperingState",
    "build",
    "default_generator",
    "describe",
    "describe_value",
    "fit_base",
    "tempering_summary",
]

_CLASSES = (
    Persistent,
    Replay,
    ShortRun,
    GeneratorNegatives,
    Hybrid,
    ContrastiveDivergence,
    ParallelTempering,
    NoNegatives,
)
REGISTRY = {cls.name: cls for cls in _CLASSES}
KINDS = tuple(REGISTRY)


def build(negatives: str | NegativeSampler, **settings) -> NegativeSampler:
    """The negative sampler ``negatives`` names, configured from ``settings`` (each kind takes
    the settings it has and ignores the rest: ``fit`` passes all of its own), or
    ``negatives`` itself when it is already a ``NegativeSampler``.

    Example:
        >>> build("replay", num_chains=64, buffer_size=1000, entropy="batch_norm").buffer_size
        1000
    """
    if isinstance(negatives, NegativeSampler):
        return negatives
    if not isinstance(negatives, str) or negatives not in REGISTRY:
        raise ValueError(
            f"unknown negatives {negatives!r}; choose one of {KINDS} or pass a "
            "numpyro_ebm.negatives.NegativeSampler"
        )
    cls = REGISTRY[negatives]
    names = {f for f in cls.__dataclass_fields__ if cls.__dataclass_fields__[f].init}
    return cls(**{k: v for k, v in settings.items() if k in names})
