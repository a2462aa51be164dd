"""Which requests to a pool's host are API calls: only those get a key and count against it."""

from __future__ import annotations

API_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
NOT_API_PATHS = frozenset({"", "/", "/favicon.ico", "/robots.txt"})


def is_api_call(method: str, path: str) -> bool:
    """Whether a request needs a pool key. Reachability probes (`HEAD /`), CORS preflights
    (`OPTIONS`) and requests for the bare site root are not API calls: they go out without any
    credential and are neither admitted against a key's limits nor counted on a key."""
    if method.upper() not in API_METHODS:
        return False
    return path.split("?", 1)[0] not in NOT_API_PATHS
