"""No PRNG key is used twice: ``tests/keys.py`` records every key the library splits or draws
from as the compiled programs run."""

import jax
import jax.numpy as jnp
import keys
import numpy as np

import numpyro_ebm as ebm
from numpyro_ebm.training import keys as training_keys


def test_a_retry_uses_no_key_of_the_rejected_attempt():
    """A rejected attempt splits its key into the batch's and the step's, and the step's goes
    to the negative sampler, which splits it again: the retry's key is none of these."""
    key, step = jax.random.key(3), jnp.asarray(7)
    first = training_keys.attempt_key(key, step, jnp.asarray(0))
    k_batch, k_step = jax.random.split(first)
    used = [first, k_batch, k_step, *jax.random.split(k_step)]
    for rejected in (1, 2):
        retry = jax.random.key_data(training_keys.attempt_key(key, step, jnp.asarray(rejected)))
        assert not any(np.array_equal(retry, jax.random.key_data(k)) for k in used)


def test_no_key_is_used_twice_in_a_fit():
    """Every key ``fit`` derives is split or drawn from once: the hybrid's generator and chains,
    the probe points, the learned and the tracked log Z, the floor, and the AIS after training
    (``tests/keys.py`` records them as the compiled program runs)."""
    data = jax.random.normal(jax.random.key(0), (128, 2))
    energy = ebm.energies.MLPEnergy(2, hidden=(8,), key=jax.random.key(1))
    with keys.audit() as used:
        ebm.fit(
            energy, data, key=jax.random.key(2), negatives="hybrid", num_steps=2,
            steps_per_call=2, num_chains=8, num_mcmc_steps=2, batch_size=8, log_z_particles=16,
            log_z_groups=2, log_z_floor_samples=8, progress_bar=False,
            calibrate_log_z={"num_temperatures": 2, "num_runs": 2, "num_particles": 4},
        )  # fmt: skip
    where = {w.split("@")[1].split(":")[0] for ws in used.uses.values() for w in ws}
    assert {"negatives/hybrid.py", "logz/tracking.py", "logz/ais.py"} <= where  # it recorded
    assert used.twice() == []
