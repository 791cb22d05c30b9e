"""Modules imported on first use.

torch and torchvision take seconds and hundreds of MB to import. Django imports the
apps' services and selectors at start, so an eager `from . import encoder` made every
`manage.py` command (`migrate`, `store check`, `roles`) pay for torch it never used.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule(ModuleType):
    """Stands for module `name` and imports it when one of its attributes is first read.

    The import goes through the ordinary import system (`importlib.import_module`),
    whose per-module lock makes two threads that reach it at once share one import;
    importlib's own LazyLoader is not thread-safe on Python 3.11."""

    def __getattr__(self, attribute: str) -> Any:  # only for what the proxy itself lacks
        return getattr(importlib.import_module(self.__name__), attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r}>"
