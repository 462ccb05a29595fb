"""The PRNG keys of training: which key each part of a step gets, none used twice.

* ``attempt_key(loop_key, step, rejected)``: one key per attempt at a step; the loop splits it
  into the batch's key and the step's.
* ``site_keys(step_key, names)``: one key per energy-based site (the key itself for one site).
  A site's key goes whole to its negative sampler, which splits it or draws from it; its other
  uses are children folded in with the tags ``PROBES``, ``TRACKER``, ``LOG_Z_NOISE`` and
  ``FLOOR``. JAX's ``split(key, n)[i]`` is ``fold_in(key, i)`` (and the i-th value drawn from
  ``key`` comes from the same bits), so tags at 2³¹ and above are apart from whatever the
  sampler derives.
* ``model_key(step_key)``: the model's own stream (e.g. its subsampling: the same for the
  current and the averaged parameters), and from it ``objective_key`` and (at
  ``MaximumLikelihood.init``) ``params_key``, the params' random initialisers'.

``tests/test_keys.py`` records every key a ``fit`` splits or draws from, as it runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "FLOOR",
    "LOG_Z_NOISE",
    "PROBES",
    "TRACKER",
    "attempt_key",
    "model_key",
    "objective_key",
    "params_key",
    "site_keys",
]

PROBES, TRACKER, LOG_Z_NOISE, FLOOR, _RETRY = (2**31 + i for i in range(5))


def attempt_key(key: jax.Array, step: jax.Array, num_rejected: jax.Array) -> jax.Array:
    """The PRNG key of an attempt at training step ``step``: ``fold_in(key, step)`` for the
    first attempt; after ``num_rejected`` consecutive rejected attempts a key of its own
    (apart from every key the first attempt derives), so a retry draws a new batch and new
    negatives instead of repeating the rejected step. Both numbers are in the state, so a
    resumed run retries exactly as an uninterrupted one."""
    step_key = jax.random.fold_in(key, step)
    retry_key = jax.random.fold_in(jax.random.fold_in(step_key, _RETRY), num_rejected)
    # a select, not a branch: on a GPU a branch waits for its predicate on the host every step
    return jnp.where(num_rejected > 0, retry_key, step_key)


def site_keys(key: jax.Array, names) -> dict:
    """One key per site: the key itself for a single site, else ``fold_in(key, index)``."""
    if len(names) == 1:
        return {names[0]: key}
    return {name: jax.random.fold_in(key, i) for i, name in enumerate(names)}


def model_key(key: jax.Array) -> jax.Array:
    """The model's own stream (e.g. its subsampling) from a step's key."""
    return jax.random.fold_in(key, 0x6D6F64)


def objective_key(model_key: jax.Array) -> jax.Array:
    """The objective's PRNG key (its projections or noise) from the key a problem's ``loss``
    gets: a stream of its own, apart from the model's."""
    return jax.random.fold_in(model_key, 0x6F626A)


def params_key(model_key: jax.Array) -> jax.Array:
    """The key a model's ``numpyro.param`` initialisers draw from when ``MaximumLikelihood``
    traces it at ``init``: apart from the model's stream and every site's key."""
    return jax.random.fold_in(model_key, 0x706172)
