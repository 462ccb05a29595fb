"""Where chains start: persistent bank, replay with re-initialisation, short runs from the base."""

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_ebm import negatives


def setup(n=4000):
    data = jax.random.normal(jax.random.key(0), (n, 2)) * jnp.array([2.0, 0.5]) + 3.0
    return data, negatives.fit_base(data)


def test_base_is_the_data_gaussian():
    data, base = setup()
    draws = base.sample(jax.random.key(1), 20_000)
    np.testing.assert_allclose(draws.mean(0), data.mean(0), atol=4 * 2.0 / np.sqrt(20_000))
    np.testing.assert_allclose(jnp.std(draws, 0), jnp.std(data, 0), rtol=0.03)


def test_initial_bank_is_made_of_training_points():
    data, _ = setup()
    for kind, size in (("persistent", 64), ("replay", 500), ("short_run", 64)):
        bank = negatives.init_bank(jax.random.key(2), kind, data, 64, 500)
        assert bank.shape == (size, 2)
        # every row is one of the data points
        dist = jnp.min(jnp.sum((bank[:, None] - data[None]) ** 2, -1), axis=1)
        assert float(dist.max()) == 0.0


def test_reinitialised_fraction_and_sources():
    data, base = setup()
    bank = jnp.full((1000, 2), -100.0)  # far from all data
    batch = data[:256]
    for kind in ("persistent", "replay"):
        starts, rows = negatives.chain_starts(jax.random.key(3), kind, bank, base, 1000, 0.1, batch)
        fresh = np.asarray(starts[:, 0] > -50)
        # Binomial(1000, 0.1): mean 100, sd 9.5
        assert abs(fresh.sum() - 100) < 4.5 * 9.5
        # re-initialised chains start at batch points
        dist = jnp.min(jnp.sum((starts[fresh][:, None] - batch[None]) ** 2, -1), axis=1)
        assert float(dist.max()) == 0.0
        assert (rows is None) == (kind == "persistent")
    starts, rows = negatives.chain_starts(
        jax.random.key(4), "short_run", bank, base, 1000, 0.1, batch
    )
    assert rows is None and float(jnp.abs(starts.mean(0) - data.mean(0)).max()) < 0.3


def test_update_bank_writes_back_replay_rows():
    bank = jnp.zeros((10, 2))
    finals = jnp.ones((3, 2))
    rows = jnp.array([1, 4, 7])
    updated = negatives.update_bank("replay", bank, finals, rows)
    assert float(updated.sum()) == 6.0 and float(updated[4, 0]) == 1.0
    assert negatives.update_bank("persistent", bank, finals, None) is finals
