"""What management commands share."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# Loggers that write a line per item: one per study triaged, whether the command triages
# or the background jobs its ingest starts do.
PER_ITEM_LOGGERS = ("triage.services",)


@contextmanager
def per_item_logs(verbosity: int) -> Iterator[None]:
    """Hold the per-item loggers to warnings at verbosity 0 and 1, so that a command's
    progress bar and summary are not buried under hundreds of lines; -v 2 shows them.
    Levels are put back as they were when the block ends."""
    if verbosity >= 2:
        yield
        return
    loggers = [logging.getLogger(name) for name in PER_ITEM_LOGGERS]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, before, strict=True):
            logger.setLevel(level)


def quiet_per_item_logs(handle: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a command's `handle` with `per_item_logs(verbosity)`, also over the
    background jobs its work started: they are run before the levels are put back
    (manage.py would run them just after, each logging its line)."""

    @functools.wraps(handle)
    def wrapper(self: Any, *args: Any, **options: Any) -> Any:
        from precedent.tasks import finish_background_jobs

        with per_item_logs(options.get("verbosity", 1)):
            result = handle(self, *args, **options)
            finish_background_jobs()
            return result

    return wrapper
