"""Training: one core (``core.init`` / ``core.step``) over a problem, an objective and a
negative sampler; one loop (``loop.train``); ``fit`` for an energy on data and
``MaximumLikelihood`` for a NumPyro model on top; checkpoints.

* ``config.py``: ``TrainConfig``, every setting of a run.
* ``objective.py``: the objective interface (maximum likelihood today).
* ``core.py``: the pure training step.
* ``loop.py``: the compiled scan, progress, divergence, records.
* ``checkpoint.py``: atomic checkpoints, one writer per folder.
* ``inputs.py``: what ``fit`` checks and prepares before training.
* ``fit.py``: ``fit``, ``FitResult``, ``load``.
* ``model.py``: ``MaximumLikelihood``.
"""

from numpyro_ebm.training.checkpoint import (
    CheckpointError,
    checkpoint_best_step,
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from numpyro_ebm.training.config import (
    MATMUL_PRECISIONS,
    TrainConfig,
    default_energy_l2,
    default_optimizer,
)
from numpyro_ebm.training.core import (
    Site,
    SiteInfo,
    SiteTerms,
    StepInfo,
    TrainState,
    free_constants,
    init,
    keep_if_finite,
    moving_average,
    step,
)
from numpyro_ebm.training.fit import (
    EnergyProblem,
    FitResult,
    energy_init,
    energy_step,
    fit,
    load,
)
from numpyro_ebm.training.keys import attempt_key
from numpyro_ebm.training.loop import TrainingDivergedError, history_columns, train
from numpyro_ebm.training.model import (
    MaximumLikelihood,
    MaximumLikelihoodResult,
    MLInfo,
    MLState,
    ModelProblem,
)
from numpyro_ebm.training.objective import (
    DenoisingScoreMatching,
    LikelihoodObjective,
    Objective,
    ObjectiveTerms,
    ScoreMatching,
    SlicedScoreMatching,
    build_objective,
)

__all__ = [
    "MATMUL_PRECISIONS",
    "CheckpointError",
    "DenoisingScoreMatching",
    "EnergyProblem",
    "FitResult",
    "LikelihoodObjective",
    "MLInfo",
    "MLState",
    "MaximumLikelihood",
    "MaximumLikelihoodResult",
    "ModelProblem",
    "Objective",
    "ObjectiveTerms",
    "ScoreMatching",
    "Site",
    "SiteInfo",
    "SiteTerms",
    "SlicedScoreMatching",
    "StepInfo",
    "TrainConfig",
    "TrainState",
    "TrainingDivergedError",
    "attempt_key",
    "build_objective",
    "checkpoint_best_step",
    "checkpoint_step",
    "default_energy_l2",
    "default_optimizer",
    "energy_init",
    "energy_step",
    "fit",
    "free_constants",
    "history_columns",
    "init",
    "keep_if_finite",
    "latest_checkpoint",
    "load",
    "load_checkpoint",
    "moving_average",
    "save_checkpoint",
    "step",
    "train",
]
