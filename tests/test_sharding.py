"""Chains and batch sharded over 4 forced CPU devices give the 1-device result."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    import numpyro_ebm as ebm
    assert jax.device_count() == 4, jax.devices()
    data = ebm.datasets.toy("8gaussians").sample(jax.random.key(0), 4000)
    energy = ebm.energies.MLPEnergy(2, hidden=(32, 32), key=jax.random.key(1))
    kwargs = dict(key=jax.random.key(2), num_steps=40, num_chains=128, batch_size=128,
                  num_mcmc_steps=5, steps_per_call=20, progress_bar=False)
    sharded = ebm.fit(energy, data, **kwargs)
    single = ebm.fit(energy, data, devices=jax.devices()[:1], **kwargs)
    shards = sharded.state.bank.sharding.device_set
    assert len(shards) == 4, shards
    assert len(single.state.bank.sharding.device_set) == 1
    diffs = [float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(sharded.energy), jax.tree.leaves(single.energy))]
    chains = float(jnp.max(jnp.abs(sharded.chains - single.chains)))
    print("MAXDIFF", max(diffs), chains)
    # same random numbers on any sharding (threefry is partitionable); only the order of
    # floating-point reductions differs, so agreement is to float32 round-off accumulated
    # over 40 steps
    assert max(diffs) < 1e-4 and chains < 1e-3, (max(diffs), chains)
    try:
        ebm.fit(energy, data, **{**kwargs, "num_chains": 130})
    except ValueError as err:
        assert "multiples of 4" in str(err)
    else:
        raise AssertionError("expected a ValueError for 130 chains on 4 devices")
    """
)


def test_four_forced_cpu_devices_match_one_device():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "MAXDIFF" in out.stdout
