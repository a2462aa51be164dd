"""Which requests to a pool's host are API calls (and so get a key)."""

from __future__ import annotations

import pytest

from kmi_rotor.core.calls import is_api_call


@pytest.mark.parametrize(
    ("method", "path", "api"),
    [
        ("POST", "/v1/chat/completions", True),
        ("POST", "/v1/messages?beta=true", True),
        ("GET", "/v1/models", True),
        ("get", "/coding/v1/usages", True),
        ("DELETE", "/v1/files/f1", True),
        ("HEAD", "/", False),  # Claude Code's reachability probe
        ("HEAD", "/v1/messages", False),
        ("OPTIONS", "/v1/chat/completions", False),  # a CORS preflight
        ("GET", "/", False),
        ("GET", "/?x=1", False),
        ("GET", "/favicon.ico", False),
        ("CONNECT", "/", False),
        ("TRACE", "/v1/messages", False),
    ],
)
def test_is_api_call(method: str, path: str, api: bool) -> None:
    assert is_api_call(method, path) is api
