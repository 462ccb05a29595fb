"""Test-session plumbing.

Each pytest-xdist worker runs on its own CPU cores. Unpinned, two JAX processes on a 2-core
machine slow each other down about fivefold (measured: two concurrent GaussianEnergy fits took
220 s each, against 46 s alone and 44 s for both when each is pinned to one core): XLA's CPU
thread pools of both processes contend for the same cores. Subprocesses (notebook kernels, CLI
runs) inherit their worker's cores.

Every compiled XLA CPU program keeps its own memory mappings; a single pytest process that
compiles the whole suite's programs reaches the kernel's ``vm.max_map_count`` (65 530 by
default) and XLA then crashes while compiling (SIGABRT / SIGSEGV). Dropping JAX's caches after
each test module frees them; tests within a module still share their compiled programs.

The suite compiles with most of XLA's optimisations off (the Makefile sets
``JAX_DISABLE_MOST_OPTIMIZATIONS``): most tests compile more than they run. A test marked
``optimized`` compiles with them on: one whose programs run far longer than they compile (the
64-D tracker start of the digits CLI test: 38 s unoptimised, 6 s optimised). Long trainings
in 2-D are not such programs (measured: as slow or slower optimised).
"""

import gc
import os


def _pin_this_worker() -> None:
    worker, count = (
        os.environ.get("PYTEST_XDIST_WORKER"),
        os.environ.get("PYTEST_XDIST_WORKER_COUNT"),
    )
    if not (worker and count and hasattr(os, "sched_setaffinity")):
        return
    cpus, count = sorted(os.sched_getaffinity(0)), int(count)
    if count <= len(cpus):
        os.sched_setaffinity(0, cpus[int(worker.removeprefix("gw")) :: count])


_pin_this_worker()  # before JAX starts its thread pools, which inherit the cores

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _xla_optimisations_for_long_programs(request):
    if request.node.get_closest_marker("optimized") is None:
        yield
        return
    saved = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", saved)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def resolved_config_of(monkeypatch):
    """``resolved(**settings)``: the ``TrainConfig`` that ``fit`` resolves for a
    ``GaussianEnergy`` on 512 rows of 2-D data with those settings, without any compute (a
    stand-in for ``core.init`` raises with it)."""
    import numpyro_ebm as ebm
    from numpyro_ebm.training import core

    class Reached(Exception):
        pass

    def reached(key, params, data, problem, config):
        raise Reached(config)

    monkeypatch.setattr(core, "init", reached)
    data = jax.random.normal(jax.random.key(0), (512, 2)) * jax.numpy.array([1.0, 2.0]) + 1.0

    def resolved(**settings):
        energy = ebm.energies.GaussianEnergy(jax.numpy.zeros(2))
        with pytest.raises(Reached) as info:
            ebm.fit(energy, data, key=jax.random.key(1), **settings)
        return info.value.args[0]

    return resolved
