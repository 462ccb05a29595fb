"""The runnable examples of the docs pages (each ```python block of a page, in order)."""

from __future__ import annotations

import pathlib
import re
import sys
import types

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PAGES = ["architecture.md"]


def _blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page):
    blocks = _blocks(page)
    assert blocks, f"{page} has no python example"
    module = types.ModuleType(f"docs_{page.removesuffix('.md')}")  # dataclasses need a module
    sys.modules[module.__name__] = module
    try:
        for block in blocks:
            exec(compile(block, f"docs/{page}", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
