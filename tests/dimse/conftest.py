"""A running C-STORE listener wired to the ingest service, and pynetdicom as the sender."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from pynetdicom import AE
from pynetdicom.association import Association

from dimse.listener import Listener
from dimse.services import build_listener

AE_TITLE = "PRECEDENT"
SENDER = "MODALITY"


@pytest.fixture
def start_listener(transactional_db) -> Iterator[Callable[..., Listener]]:
    """Start `build_listener(...)` (what the command runs) on a free loopback port.

    Its associations run in their own threads with their own database connections,
    so the test database must be committed for them to see it: transactional_db.
    """
    started: list[Listener] = []

    def start(**options) -> Listener:
        options.setdefault("ae_title", AE_TITLE)
        listener = build_listener(**options)
        listener.start("127.0.0.1", 0)
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.stop(timeout=10)


@pytest.fixture
def listener(start_listener) -> Listener:
    return start_listener()


@contextmanager
def associate(
    listener: Listener,
    contexts: list[tuple[str, list[str] | None]],
    *,
    calling: str = SENDER,
    called: str = AE_TITLE,
) -> Iterator[Association]:
    """An association from pynetdicom (the sending side) proposing `contexts`:
    (SOP class, transfer syntaxes or None for pynetdicom's uncompressed defaults)."""
    ae = AE(ae_title=calling)
    for abstract_syntax, syntaxes in contexts:
        if syntaxes is None:
            ae.add_requested_context(abstract_syntax)
        else:
            ae.add_requested_context(abstract_syntax, syntaxes)
    assoc = ae.associate(*listener.address, ae_title=called)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll until `predicate()` is true: what the listener logs or closes after it has
    answered the sender happens a moment later, in the association's thread."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the listener")
        time.sleep(0.02)
