"""Defaults that follow the data: the energy stabiliser's weight by the data's dimension."""

import jax
import numpy as np
import pytest

import numpyro_ebm as ebm
from numpyro_ebm.training import default_energy_l2


@pytest.mark.parametrize(
    ("size", "expected"), [(1, 0.01), (2, 0.01), (3, 0.02 / 3), (13, 0.02 / 13), (64, 3.125e-4)]
)
def test_the_default_energy_l2_is_0_02_over_the_dimension_at_most_0_01(size, expected):
    assert default_energy_l2(size) == pytest.approx(expected, rel=1e-12)
    resolved = ebm.TrainConfig().resolve(schedule_steps=10, event_size=size)
    assert resolved.energy_l2 == pytest.approx(expected, rel=1e-12)


def test_a_given_energy_l2_wins_and_a_config_without_data_gets_the_2d_value():
    assert ebm.TrainConfig(energy_l2=0.5).resolve(10, event_size=64).energy_l2 == 0.5
    assert ebm.TrainConfig(energy_l2=0.0).resolve(10, event_size=64).energy_l2 == 0.0
    assert ebm.TrainConfig().resolve(schedule_steps=10).energy_l2 == 0.01
    with pytest.raises(ValueError, match="energy_l2"):
        ebm.TrainConfig(energy_l2=-1.0)


def test_fit_resolves_the_default_from_its_datas_dimension(tmp_path):
    data = np.random.default_rng(0).normal(size=(200, 5)).astype(np.float32)
    settings = dict(
        num_steps=2, num_chains=16, batch_size=16, num_mcmc_steps=1, steps_per_call=1,
        track_log_z=False, progress_bar=False,
    )  # fmt: skip
    energy = ebm.energies.MLPEnergy(5, hidden=(8,), key=jax.random.key(0))
    res = ebm.fit(energy, data, key=jax.random.key(1), checkpoint_dir=tmp_path, **settings)
    assert res.config.energy_l2 == pytest.approx(0.004, rel=1e-12)
    # the checkpoint records the number: a resume with the default matches it, one with
    # another weight is refused by name
    again = ebm.fit(energy, data, key=jax.random.key(1), checkpoint_dir=tmp_path, **settings)
    assert int(again.state.step) == 2
    with pytest.raises(ValueError, match="energy_l2"):
        ebm.fit(
            energy, data, key=jax.random.key(1), checkpoint_dir=tmp_path, energy_l2=0.01,
            **settings,
        )  # fmt: skip


def test_maximum_likelihood_sets_the_default_from_its_ebm_sites():
    import numpyro
    import optax
    from numpyro.contrib.module import eqx_module

    start = ebm.energies.MLPEnergy(5, hidden=(8,), key=jax.random.key(2))

    def model(x):
        energy = eqx_module("energy", start)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", ebm.EnergyDistribution(energy, (5,)), obs=x)

    data = np.random.default_rng(1).normal(size=(32, 5)).astype(np.float32)
    learner = ebm.MaximumLikelihood(model, optax.adam(1e-3), num_chains=8, num_mcmc_steps=1)
    learner.init(jax.random.key(3), data)
    assert learner.config.energy_l2 == pytest.approx(0.004, rel=1e-12)
    given = ebm.MaximumLikelihood(model, optax.adam(1e-3), num_chains=8, energy_l2=0.3)
    given.init(jax.random.key(3), data)
    assert given.config.energy_l2 == 0.3
