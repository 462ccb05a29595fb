"""Best-model selection and early stopping on the held-out NLL (``training.selection``).

The training data are N(0, 3² I) and the validation data N(0, 1.5² I): a Gaussian energy
that starts at N(0, I) passes the validation set's best fit on its way to the training data's,
so the held-out NLL has its minimum in the middle of the run.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import numpyro_ebm as ebm
from numpyro_ebm import training
from numpyro_ebm.energies import GaussianEnergy
from numpyro_ebm.training import checkpoint

SETTINGS = dict(  # the held-out NLL uses the tracked log Z (the default)
    num_chains=16,
    num_mcmc_steps=2,
    batch_size=64,
    record_every=5,
    log_z_particles=128,
    log_z_groups=4,
    steps_per_call=5,
    progress_bar=False,
    # constant learning rate: the trajectory does not depend on num_steps
    optimizer=optax.adam(0.05),
)
TRAIN = 3.0 * jax.random.normal(jax.random.key(0), (512, 2))
VALIDATION = 1.5 * jax.random.normal(jax.random.key(1), (256, 2))


def run(num_steps=80, folder=None, **kwargs):
    return ebm.fit(
        GaussianEnergy(jnp.zeros(2)),
        TRAIN,
        key=jax.random.key(2),
        num_steps=num_steps,
        validation_data=VALIDATION,
        checkpoint_dir=folder,
        **{**SETTINGS, **kwargs},
    )


def heldout_nll(energy, log_z):
    return float(jnp.mean(jax.vmap(energy)(VALIDATION)) + log_z)


@pytest.fixture(scope="module")
def full():
    return run()


def scored(result):
    nll = result.history["heldout_nll"]
    steps = np.arange(1, len(nll) + 1)  # every step was accepted in these runs
    return steps[np.isfinite(nll)], nll[np.isfinite(nll)]


def test_the_selected_energy_is_the_average_at_the_lowest_heldout_nll(full):
    steps, nll = scored(full)
    assert full.best_step == steps[np.argmin(nll)]
    assert 10 <= full.best_step <= 60  # the minimum is inside the run (see the module)
    assert nll.min() < nll[-1] - 0.05  # and the last energy is clearly worse
    # the returned energy and log Z give that lowest score: they are that step's
    assert full.log_z.info["step"] == full.best_step
    assert heldout_nll(full.energy, full.log_z.value) == pytest.approx(nll.min(), abs=1e-4)


def test_patience_stops_after_that_many_steps_without_improvement(full):
    stopped = run(patience=20)
    best = stopped.best_step
    assert best == full.best_step  # the same trajectory up to the stop
    step = int(stopped.state.step)
    # checked after each compiled call (5 steps): stops in the first call with 20 steps gone
    assert 20 <= step - best < 20 + SETTINGS["steps_per_call"]
    assert step < 80
    np.testing.assert_array_equal(
        stopped.history["heldout_nll"], full.history["heldout_nll"][:step]
    )


def test_an_interrupted_run_resumes_and_selects_as_an_uninterrupted_one(
    tmp_path, full, monkeypatch
):
    real_save = checkpoint.save_checkpoint

    def save_then_stop(folder, state, history, meta):
        real_save(folder, state, history, meta)
        if meta["step"] == 40:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            run(folder=tmp_path)
    resumed = run(folder=tmp_path)
    assert resumed.best_step == full.best_step
    best = jax.tree.leaves(full.state.best)
    for a, b in zip(jax.tree.leaves(resumed.state.best), best, strict=True):
        np.testing.assert_array_equal(a, b)
    loaded = ebm.load(
        tmp_path,
        GaussianEnergy(jnp.zeros(2)),
        config=ebm.TrainConfig(
            **{k: v for k, v in SETTINGS.items() if k not in ("steps_per_call", "progress_bar")}
        ),
    )
    assert loaded.best_step == full.best_step


def test_an_early_stopped_run_stays_stopped_when_rerun(tmp_path):
    first = run(folder=tmp_path, patience=20)
    again = run(folder=tmp_path, patience=20)
    assert int(again.state.step) == int(first.state.step) < 80
    assert again.best_step == first.best_step
    # a run without selection cannot resume it: the settings differ, by name
    with pytest.raises(ValueError, match="select_best: True -> False"):
        run(folder=tmp_path, select_best=False)


def test_bad_patience_is_refused_before_any_compute():
    energy = GaussianEnergy(jnp.zeros(2))
    with pytest.raises(ValueError, match="patience needs validation_data"):
        ebm.fit(energy, TRAIN, key=jax.random.key(0), patience=10)
    with pytest.raises(ValueError, match="patience needs validation_data"):
        run(patience=10, select_best=False)
    with pytest.raises(ValueError, match="at least record_every"):
        run(patience=3)
    with pytest.raises(ValueError, match="whole number"):
        run(patience=12.5)


class SiluMLPEnergy(eqx.Module):
    """eqx.nn.MLP keeps its activation function as a (non-array) field."""

    mlp: eqx.nn.MLP

    def __init__(self, *, key):
        self.mlp = eqx.nn.MLP(2, "scalar", 8, 1, activation=jax.nn.silu, key=key)

    def __call__(self, x):
        return self.mlp(x) + 0.01 * jnp.sum(x**2)


def test_a_score_that_is_not_finite_is_never_selected():
    """NaN (between evaluations), −inf (a normaliser that is not finite) and +inf are not
    held-out scores: the best so far stays; a finite lower score replaces it."""
    best = training.selection.start(SimpleNamespace(average_params=jnp.zeros(2), log_z={"x": 0}))
    state = SimpleNamespace(average_params=jnp.ones(2), step=jnp.asarray(3, jnp.int32))
    log_z = {"x": (jnp.asarray(1.0), jnp.asarray(0.1))}
    for score in (-np.inf, np.nan, np.inf):
        kept = training.selection.update(best, state, jnp.asarray(score, jnp.float32), log_z)
        assert int(kept.step) == -1 and float(kept.params[0]) == 0.0, score
    chosen = training.selection.update(best, state, jnp.asarray(5.0, jnp.float32), log_z)
    assert int(chosen.step) == 3 and float(chosen.params[0]) == 1.0


def test_selection_keeps_an_energy_with_function_fields():
    res = ebm.fit(
        SiluMLPEnergy(key=jax.random.key(3)),
        TRAIN,
        key=jax.random.key(4),
        num_steps=10,
        validation_data=VALIDATION,
        **{**SETTINGS, "track_log_z": False},
    )
    assert res.best_step in (5, 10)
    assert res.energy.mlp.activation is jax.nn.silu
    assert np.isfinite(float(res.energy(jnp.ones(2))))


def test_a_run_checkpointed_before_selection_existed_resumes_without_it(tmp_path):
    run(10, folder=tmp_path, select_best=False)
    meta_path = os.path.join(training.latest_checkpoint(str(tmp_path)), "meta.json")
    meta = json.loads(open(meta_path).read())
    del meta["select_best"]  # as an earlier version wrote it
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    resumed = run(20, folder=tmp_path)  # select_best=True by default
    assert resumed.best_step is None and int(resumed.state.step) == 20
