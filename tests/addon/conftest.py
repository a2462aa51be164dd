"""Flows of these tests reach the request hooks as they do in mitmproxy before the upstream
connection is made: mitmproxy's `tflow` fills in an established TLS connection under the
server name "address", which kmi-rotor would rightly refuse to send a key over (421)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from mitmproxy.test import tflow


@pytest.fixture(autouse=True)
def unconnected_upstream() -> Iterator[None]:
    """Set by hand, not with monkeypatch: tests call `monkeypatch.undo()` for their own."""
    made = tflow.tserver_conn

    def tserver_conn():  # type: ignore[no-untyped-def]
        c = made()
        c.sni = None
        c.timestamp_tls_setup = None
        return c

    tflow.tserver_conn = tserver_conn
    try:
        yield
    finally:
        tflow.tserver_conn = made
