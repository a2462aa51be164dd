"""Host patterns: `host`, `host:port` and `*.example.com`, optionally with a scheme.

A pattern written with `http://` allows pool keys over plain HTTP to that host; `https://` or
no scheme means TLS only (plain HTTP is then allowed to a loopback host alone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class HostPattern:
    host: str
    """Lower-case host name or address; for a wildcard, the suffix without `*.`."""
    port: int | None
    wildcard: bool
    scheme: str | None = None
    """`http` or `https` when the pattern was written with one; None otherwise."""

    @classmethod
    def parse(cls, text: str) -> HostPattern:
        """Parse a pattern; raise ValueError with a readable reason."""
        raw = text.strip().lower()
        scheme: str | None = None
        for prefix in ("https://", "http://"):
            if raw.startswith(prefix):
                scheme, raw = prefix[:-3], raw[len(prefix) :]
                break
        if raw.endswith("."):  # a fully qualified name means the same host
            raw = raw[:-1]
        if not raw or "/" in raw or " " in raw or "@" in raw:
            raise ValueError(
                f"not a host pattern: {text!r} (use host, host:port or *.domain, "
                "optionally after https:// or http://)"
            )
        port: int | None = None
        host = raw
        if raw.startswith("["):  # [v6]:port
            end = raw.find("]")
            if end < 0:
                raise ValueError(f"unclosed '[' in host pattern {text!r}")
            host, rest = raw[1:end], raw[end + 1 :]
            if rest:
                port = _port(rest.removeprefix(":"), text)
        elif raw.count(":") == 1:
            host, port_text = raw.split(":")
            port = _port(port_text, text)
        wildcard = host.startswith("*.")
        if wildcard:
            host = host[2:]
        if not host or "*" in host:
            raise ValueError(f"'*' may only open a pattern, as in *.example.com: {text!r}")
        return cls(host, port, wildcard, scheme)

    def matches(self, host: str, port: int) -> bool:
        """Whether host:port is this pattern's (the scheme is not part of the match: a plain
        HTTP request to a TLS-only host belongs to the pool, and is refused for it)."""
        if self.port is not None and self.port != port:
            return False
        host = host.lower().strip("[]").rstrip(".")
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host

    @property
    def place(self) -> str:
        """host[:port] without the scheme: two patterns with the same place name one host."""
        host = f"*.{self.host}" if self.wildcard else self.host
        if ":" in host:
            host = f"[{host}]"
        return host if self.port is None else f"{host}:{self.port}"

    def __str__(self) -> str:
        return self.place if self.scheme is None else f"{self.scheme}://{self.place}"


def _port(text: str, pattern: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in host pattern {pattern!r}")
    return int(text)


class HostLookup[T]:
    """`find(host, port)` remembered: the answer for a host:port is worked out once per
    configuration (a lookup object lives as long as the configuration it was made from).

    Bounded: past `limit` different host:port pairs (names a client made up), the rest are
    worked out each time rather than remembered.
    """

    def __init__(
        self, find: Callable[[str, int], T], *, source: object = None, limit: int = 4096
    ) -> None:
        self._find = find
        self.source = source
        """What the answers were worked out from (the configuration), to tell when to renew."""
        self._known: dict[tuple[str, int], T] = {}
        self._limit = limit

    def __call__(self, host: str, port: int) -> T:
        key = (host, port)
        try:
            return self._known[key]
        except KeyError:
            found = self._find(host, port)
            if len(self._known) < self._limit:
                self._known[key] = found
            return found
