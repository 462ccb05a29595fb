"""Which PRNG keys the library uses, recorded as it runs (for tests of "no key used twice").

``audit()`` wraps ``jax.random``'s splitting and drawing functions while it is open. Each call
made from the library's own code records the key's value when it runs (through
``jax.debug.callback``, so keys inside jit, scan, vmap and cond count as they are used, once
per use). A key is *used* when it is split or drawn from; folding data into it derives a child
and does not use it. JAX's ``split(key, n)[i]`` equals ``fold_in(key, i)``, so a key derived
two ways is caught when both are used.
"""

from __future__ import annotations

import contextlib
import traceback
from collections import defaultdict

import jax
import numpy as np

_USES = ("split", "normal", "uniform", "bernoulli", "randint", "categorical", "choice",
         "permutation", "gumbel", "truncated_normal", "exponential", "gamma", "beta",
         "dirichlet", "multivariate_normal", "bits", "laplace", "logistic", "poisson", "t",
         "cauchy", "rademacher", "orthogonal", "ball")  # fmt: skip


def _caller() -> str | None:
    """``file:line`` of the library code that called the wrapped function, or None."""
    frame = traceback.extract_stack()[-3]
    if "/numpyro_ebm/" not in frame.filename:
        return None
    return f"{frame.filename.split('/numpyro_ebm/')[-1]}:{frame.lineno}"


class KeyUses:
    """Where each key (by value) was used (``uses``: value -> ``["split@file:line", ...]``);
    ``twice()`` lists those used more than once."""

    def __init__(self):
        self.uses = defaultdict(list)

    def record(self, where, data):
        data = np.asarray(data)
        for row in data.reshape(-1, data.shape[-1]):
            self.uses[row.tobytes()].append(where)

    def twice(self) -> list[list[str]]:
        jax.effects_barrier()
        return [sorted(w) for w in self.uses.values() if len(w) > 1]


@contextlib.contextmanager
def audit():
    uses = KeyUses()
    originals = {name: getattr(jax.random, name) for name in _USES if hasattr(jax.random, name)}

    def wrap(name, fn):
        def wrapped(key, *args, **kwargs):
            where = _caller()
            if where is not None:
                data = (
                    jax.random.key_data(key)
                    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                    else key
                )
                jax.debug.callback(lambda d, w=f"{name}@{where}": uses.record(w, d), data)
            return fn(key, *args, **kwargs)

        return wrapped

    for name, fn in originals.items():
        setattr(jax.random, name, wrap(name, fn))
    jax.clear_caches()  # a program compiled before would run without the callbacks
    try:
        yield uses
    finally:
        for name, fn in originals.items():
            setattr(jax.random, name, fn)
