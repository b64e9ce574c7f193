"""What the API's unit tests share: a daemon manager over a fresh data dir, and error checks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from ember.daemon.manager import Manager
from ember.images import ImageStore
from ember.sample import write_busybox_image


@contextlib.contextmanager
def sample_manager(factory: pytest.TempPathFactory) -> Iterator[Manager]:
    """A Manager of a data dir of its own holding ``sample:latest`` (TCG; no machine runs)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("EMBER_HOME", str(factory.mktemp("home")))
    mp.setenv("EMBER_ACCEL", "tcg")
    try:
        ImageStore().import_path(write_busybox_image(factory.mktemp("img") / "s"),
                                 tag="sample:latest")
        mgr = Manager()
        try:
            yield mgr
        finally:
            mgr.db.close()
    finally:
        mp.undo()


def err(r: Any, status: int, code: str | None = None) -> str:
    """The one-line message of an API error answer of ``status`` (and ``code``)."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    if code:
        assert body["error"]["code"] == code
    msg = body["error"]["message"]
    assert msg and "\n" not in msg
    return str(msg)
