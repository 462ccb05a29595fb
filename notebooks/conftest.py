"""Notebook kernels run with XLA's optimisations on.

The test suite compiles with most of XLA's optimisations off (``JAX_DISABLE_MOST_OPTIMIZATIONS``
in the Makefile): its many small programs compile faster than they would run slower. The
notebooks run longer programs (trainings of hundreds of steps, AIS) whose unoptimised code
runs several times slower: measured on one core, the log Z notebook took 217 s with the
optimisations off and 142 s with them on, the generator notebook 118 s and 71 s.
"""

import os

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    saved = os.environ.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)  # the kernel inherits it
    try:
        return (yield)
    finally:
        if saved is not None:
            os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = saved
