"""Where a pool key may go: the host the connection goes to, named the same way everywhere.

A provider behind a shared CDN routes on the TLS server name (SNI) and the `Host` (HTTP/2
`:authority`), not on the address the proxy connected to. So a key is injected only into a
request whose Host, authority and upstream server name all name the connection target, the
pool's host. The policy: kmi-rotor rewrites Host and authority to the target (the client's
own values never leave with a key), the upstream server name is set to the target before any
TLS handshake to a pool host, and a request on an upstream connection already made under
another name is refused (421). Keys travel over TLS, except to a loopback host or a host
written with `http://` in the config (403 otherwise).

In reverse mode the same idea guards the proxy itself against DNS rebinding: a request must
name the proxy (its own address, `localhost`, or a name the config allows) in its Host.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from .access import IP, names_loopback, parse_address
from .hosts import HostPattern

DEFAULT_PORTS = {"http": 80, "https": 443}


@functools.lru_cache(maxsize=4096)
def canonical_host(host: str) -> str:
    """Lower case, no trailing dot, no brackets; an address in its one canonical spelling.
    Remembered, as `parse_authority`: the same few names come with every request."""
    bare = host.strip().lower()
    if bare.startswith("[") and bare.endswith("]"):
        bare = bare[1:-1]
    bare = bare.rstrip(".")
    ip = parse_address(bare)
    return str(ip) if ip is not None else bare


def authority(scheme: str, host: str, port: int) -> str:
    """What `Host` says for host:port: the port left out when it is the scheme's default."""
    name = canonical_host(host)
    shown = f"[{name}]" if ":" in name else name
    return shown if DEFAULT_PORTS.get(scheme) == port else f"{shown}:{port}"


@functools.lru_cache(maxsize=4096)
def parse_authority(value: str, scheme: str) -> tuple[str, int] | None:
    """host and port of a `Host` value (the scheme's default port filled in); None if bad."""
    text = value.strip()
    if not text or any(c.isspace() for c in text) or "@" in text or "/" in text:
        return None
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        return None
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return None
        port = int(port_text)
    elif scheme in DEFAULT_PORTS:
        port = DEFAULT_PORTS[scheme]
    else:
        return None
    name = canonical_host(host)
    return (name, port) if name else None


@dataclass(frozen=True)
class Route:
    """What must be fixed for a pool request to go, or why it must not."""

    authority: str
    """The one value Host and :authority must carry: the connection target."""
    sni: str
    """The upstream TLS server name the connection must have (the target host)."""
    mismatches: tuple[str, ...] = ()
    """The client's values that named another place (to rewrite, and to show)."""
    refusal: tuple[int, str, str] | None = None
    """(status, code, message) when the request must not leave with a key."""


def route(
    scheme: str,
    host: str,
    port: int,
    *,
    host_values: Sequence[str],
    upstream_sni: str | None,
    upstream_tls_done: bool,
    plain_http_allowed: bool,
) -> Route:
    """The route of a pool request to `scheme://host:port` (the connection target).

    `host_values`: every Host header and the :authority or absolute-form authority the client
    sent. `upstream_sni`/`upstream_tls_done`: the server name of the upstream connection and
    whether its handshake has happened (a name can no longer change then).
    """
    target = (canonical_host(host), port)
    want = authority(scheme, host, port)
    sni = target[0]
    if scheme != "https" and not plain_http_allowed and not names_loopback(host):
        why = (
            f"pool keys travel only over TLS, and this request is plain {scheme.upper()} to "
            f"{want}; use https, or write the host as http://{want} in the pool's hosts"
        )
        return Route(want, sni, refusal=(403, "insecure_transport", why))
    mismatches = tuple(v for v in host_values if parse_authority(v, scheme) != target)
    foreign = upstream_sni is not None and canonical_host(upstream_sni) != sni
    if scheme == "https" and upstream_tls_done and foreign:
        why = (
            f"the connection to {want} was opened under the TLS server name "
            f"{canonical_host(upstream_sni or '')!r}; a pool key goes only to its pool's host"
        )
        return Route(want, sni, mismatches, refusal=(421, "misdirected_request", why))
    return Route(want, sni, mismatches)


# -- reverse mode: requests must name the proxy ---------------------------------------------------


def reverse_host_verdict(
    host_value: str | None,
    scheme: str,
    local: tuple[str, int] | None,
    listen_hosts: Sequence[str],
    allowed: Sequence[HostPattern],
) -> str | None:
    """Why a reverse-mode request's Host does not name this proxy, or None when it does.

    Allowed: `localhost`, a loopback address, the address the client connected to or one the
    proxy listens on, each with the proxy's port; and any name in `allowed_hosts`. A page that
    a browser loaded from another name (DNS rebinding) carries that name and is refused.
    `scheme` is how the client speaks to the proxy (its default port fills a Host without one).
    """
    if host_value is None:
        return None  # an HTTP/1.0 client without Host: no browser, no rebinding
    parsed = parse_authority(host_value, scheme)
    if parsed is None:
        return f"the Host header {host_value!r} is not a host"
    name, port = parsed
    if any(p.matches(name, port) for p in allowed):
        return None
    own_port = local[1] if local else None
    ip = parse_address(name)
    here: list[IP] = []
    for h in (local[0] if local else "", *listen_hosts):
        addr = parse_address(h)
        if addr is not None and not addr.is_unspecified:
            here.append(addr)
    names_us = name == "localhost" or (ip is not None and (ip.is_loopback or ip in here))
    if names_us and port == own_port:
        return None
    return (
        f"the Host {host_value!r} does not name this proxy (use localhost or its address, or "
        "add the name to allowed_hosts in the config)"
    )
