"""Test-session plumbing.

Every compiled XLA CPU program keeps its own memory mappings; a single pytest process that
compiles the whole suite's programs reaches the kernel's ``vm.max_map_count`` (65 530 by
default) and XLA then crashes while compiling (SIGABRT / SIGSEGV). Dropping JAX's caches after
each test module frees them; tests within a module still share their compiled programs.
"""

import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    yield
    jax.clear_caches()
    gc.collect()
