"""``diagnostics.chain_lag``: chains drawn from the model do not fall; chains spread wider
than the model fall by the closed-form excess energy."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpyro_ebm as ebm

COVARIANCE = np.array([[1.0, 0.6], [0.6, 2.0]])


@pytest.fixture(scope="module")
def gaussian_run():
    data = jax.random.multivariate_normal(
        jax.random.key(0), jnp.array([1.0, -1.0]), jnp.asarray(COVARIANCE), (4000,)
    )
    energy = ebm.energies.GaussianEnergy(jnp.zeros(2))
    return ebm.fit(
        energy, data, key=jax.random.key(1), num_steps=60, num_chains=512, progress_bar=False
    )


def _exact_draws(energy, key, n):
    """Exact draws from a ``GaussianEnergy``'s distribution."""
    z = jax.random.normal(key, (n, 2))
    return energy.mean + z @ energy.scale_tril.T


def test_chains_drawn_from_the_model_do_not_fall(gaussian_run):
    last = gaussian_run.last_energy
    chains = _exact_draws(last, jax.random.key(2), 512)
    result = dataclasses.replace(gaussian_run, chains=chains)
    lag = ebm.diagnostics.chain_lag(result, key=jax.random.key(3), num_steps=400)
    assert abs(lag.lag) < 4 * lag.stderr
    assert lag.check.status == "ok" and lag.check.name == "chain_lag"
    assert lag.steps.tolist() == list(range(0, 401, 40)) and lag.mean_energy.shape == (11,)


def test_chains_spread_wider_than_the_model_fall_by_their_excess_energy(gaussian_run):
    # x = μ + 1.5 (x₀ − μ), x₀ from the model: E rises by (1.5² − 1) · ½ χ²₂, 1.25 nats on average
    last = gaussian_run.last_energy
    exact = _exact_draws(last, jax.random.key(4), 512)
    result = dataclasses.replace(gaussian_run, chains=last.mean + 1.5 * (exact - last.mean))
    lag = ebm.diagnostics.chain_lag(result, key=jax.random.key(5), num_steps=400)
    assert abs(lag.lag - 1.25) < 4 * lag.stderr
    assert lag.check.status == "fail" and "above it" in lag.check.message


def test_chain_lag_refuses_runs_without_chains_and_bad_step_counts(gaussian_run):
    with pytest.raises(ValueError, match="multiple of num_records"):
        ebm.diagnostics.chain_lag(gaussian_run, key=jax.random.key(0), num_steps=15)
    no_chains = dataclasses.replace(gaussian_run, chains=None)
    with pytest.raises(ValueError, match="kept no chains"):
        ebm.diagnostics.chain_lag(no_chains, key=jax.random.key(0))
