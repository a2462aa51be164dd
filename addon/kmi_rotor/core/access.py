"""Who may spend the pool's keys: loopback clients, and remote ones only once authenticated.

A key-injecting proxy reachable from the network is an open door to the user's money. So
kmi-rotor looks at where mitmproxy listens and whether clients must authenticate, and refuses
pool keys to anyone it cannot vouch for.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import socket
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Kind = Literal["pool", "page", "connect_pool", "other"]
"""What a client asks for: a pool key, the status page, a tunnel to a pool host, or anything
else (a relay to another host, a tunnel elsewhere)."""

FIX = (
    "listen on 127.0.0.1 (--listen-host 127.0.0.1), or set rotor_allow_remote=true together with "
    "proxyauth (regular mode) or [[clients]] tokens in the config (reverse mode)"
)


@dataclass(frozen=True)
class Exposure:
    state: Literal["local", "open", "exposed", "remote_ok"]
    """local: loopback only; open: all interfaces, no auth (loopback clients only);
    exposed: an explicit outside address, no auth (nobody served); remote_ok: authenticated."""
    message: str | None = None


@functools.lru_cache(maxsize=4096)
def parse_address(host: str) -> IP | None:
    """The IP address a host string names, spelled in any way the system's resolver reads as
    one: IPv6 with or without brackets and zone, dotted quads and their short and numeric forms
    (`127.1`, `2130706433`, `0x7f000001`, `0177.0.0.1`). IPv4-mapped IPv6 comes back as IPv4.
    None for a name. Remembered (the same few hosts come with every request; the answer
    is an immutable address)."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]
    if not text or any(c.isspace() for c in text):
        return None
    ip: IP
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        try:  # what getaddrinfo does with a numeric host: inet_aton's liberal forms
            ip = ipaddress.IPv4Address(socket.inet_aton(text))
        except (OSError, ValueError):
            return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=4096)
def is_loopback(host: str) -> bool:
    """Whether a client address is loopback (IPv4, IPv6, and IPv4 mapped into IPv6).
    Remembered: asked for every request, of the same few client addresses."""
    ip = parse_address(host)
    if ip is None:
        return host.lower() == "localhost"
    return ip.is_loopback


def names_loopback(host: str) -> bool:
    """Whether a destination host is loopback without asking a resolver: any spelling of a
    127/8 or ::1 address, and `localhost`."""
    ip = parse_address(host)
    if ip is not None:
        return ip.is_loopback
    name = host.lower().rstrip(".")
    return name == "localhost"


def exposure(listen_hosts: Iterable[str], allow_remote: bool, authenticated: bool) -> Exposure:
    """How exposed the proxy is, with the one line to say at start when it matters."""
    hosts = list(listen_hosts)
    outside = [h for h in hosts if h and not is_loopback(h)]
    everywhere = any(h == "" for h in hosts)
    if not outside and not everywhere:
        return Exposure("local")
    if allow_remote and authenticated:
        return Exposure("remote_ok")
    if outside:
        why = "without client authentication" if not authenticated else "without rotor_allow_remote"
        return Exposure(
            "exposed",
            f"kmi-rotor: listening on {', '.join(outside)} {why}: every request for a pool key is "
            f"refused (403); to fix it, {FIX}",
        )
    return Exposure(
        "open",
        "kmi-rotor: listening on all interfaces (mitmproxy's default): only loopback clients get "
        "pool keys, others are refused (403); use --listen-host 127.0.0.1",
    )


def match_token(presented: Sequence[str], tokens: Sequence[tuple[str, str]]) -> str | None:
    """The label of the client token the request carries, compared in constant time."""
    found: str | None = None
    for value in presented:
        for label, token in tokens:
            # Every comparison runs, whatever matched: timing says nothing about the tokens.
            if hmac.compare_digest(value.encode(), token.encode()) and found is None:
                found = label
    return found


def presented_credentials(headers: dict[str, str], query: dict[str, str]) -> list[str]:
    """What the client put in the usual credential slots (`Bearer` stripped)."""
    out = []
    auth = headers.get("authorization", "")
    scheme, _, rest = auth.partition(" ")
    if scheme.lower() == "bearer" and rest.strip():
        out.append(rest.strip())
    for name in ("x-api-key", "x-goog-api-key"):
        if headers.get(name):
            out.append(headers[name].strip())
    if query.get("key"):
        out.append(query["key"].strip())
    return out


# -- who: each request and tunnel ----------------------------------------------------------------

NOT_ALLOWED = "this client may not use kmi-rotor (not loopback, not authenticated)"


def token_allows(client_pools: Collection[str] | None, pool: str | None) -> bool:
    """Whether a client token bound to `client_pools` (None: every pool) opens `pool` (None:
    the status page, which every valid token may read)."""
    return pool is None or client_pools is None or pool in client_pools


def client_verdict(
    exp: Exposure,
    kind: Kind,
    *,
    loopback: bool,
    proxyauth: bool,
    token: bool,
    tokens_configured: bool,
) -> str | None:
    """Why this client may not have what it asks for, or None when it may.

    Loopback clients may do anything but spend keys of a proxy exposed without authentication.
    Others need proxyauth for anything but a pool key or the status page, which a valid client
    token also opens (with rotor_allow_remote); a tunnel to a pool host is let through for token
    clients because every request inside it is checked again. So with kmi-rotor loaded, nobody
    unauthenticated from outside gets a relay.
    """
    if kind in ("pool", "page") and exp.state == "exposed":
        return "kmi-rotor listens beyond loopback without client authentication; " + FIX
    if loopback:
        return None
    if kind == "other":
        return None if proxyauth else NOT_ALLOWED
    if kind == "connect_pool":
        if proxyauth or (exp.state == "remote_ok" and tokens_configured):
            return None
        return NOT_ALLOWED
    if exp.state == "remote_ok" and (proxyauth or token):
        return None
    return NOT_ALLOWED


# -- where: the destination of a tunnel or a connection -------------------------------------------


def is_this_machine(ip: IP, own: Callable[[IP], bool]) -> bool:
    """Loopback, unspecified (`0.0.0.0` and `::` reach this machine) or one of its addresses."""
    return ip.is_loopback or ip.is_unspecified or own(ip)


class OwnAddresses:
    """Whether an address is this machine's, asked of `probe` (a system call) and remembered
    for a while: a yes for `yes_ttl` seconds (an address that went away is refused a little
    longer, which fails closed), a no for `no_ttl` only (an address added since, say a new
    interface, is recognised within it). Loopback needs no probe: `is_this_machine` knows
    every 127/8 and ::1 address as this machine's without asking."""

    def __init__(
        self,
        probe: Callable[[IP], bool],
        clock: Callable[[], float],
        *,
        yes_ttl: float = 60.0,
        no_ttl: float = 1.0,
        limit: int = 1024,
    ) -> None:
        self._probe, self._clock = probe, clock
        self._ttl = {True: yes_ttl, False: no_ttl}
        self._known: dict[IP, tuple[bool, float]] = {}
        self._limit = limit

    def __call__(self, ip: IP) -> bool:
        now = self._clock()
        known = self._known.get(ip)
        if known is not None and now < known[1]:
            return known[0]
        own = self._probe(ip)
        if len(self._known) >= self._limit:
            self._known.clear()
        self._known[ip] = (own, now + self._ttl[own])
        return own


def destination_verdict(
    addresses: Sequence[IP],
    port: int,
    *,
    client_loopback: bool,
    pool_host: bool,
    listen_ports: Collection[int],
    own: Callable[[IP], bool],
) -> str | None:
    """Why a connection to `addresses`:`port` must not be made, or None.

    A destination that is this machine on a port the proxy listens on is the proxy itself:
    a tunnel back would make any client a loopback one. A client not on loopback may not reach
    this machine's other services either, except a pool host the operator configured.
    """
    local = [a for a in addresses if is_this_machine(a, own)]
    if not local:
        return None
    if port in listen_ports:
        return f"the destination {_show(local[0])}:{port} is this proxy itself"
    if not client_loopback and not pool_host:
        return (
            f"the destination {_show(local[0])}:{port} is this machine, and the client is not "
            "on loopback"
        )
    return None


def _show(ip: IP) -> str:
    return f"[{ip}]" if ip.version == 6 else str(ip)
