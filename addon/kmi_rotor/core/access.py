"""Who may spend the pool's keys: loopback clients, and remote ones only once authenticated.

A key-injecting proxy reachable from the network is an open door to the user's money. So
kmi-rotor looks at where mitmproxy listens and whether clients must authenticate, and refuses
pool keys to anyone it cannot vouch for.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

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


def is_loopback(host: str) -> bool:
    """Whether an address is loopback (IPv4, IPv6, and IPv4 mapped into IPv6)."""
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return host.lower() == "localhost"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


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


def client_allowed(exp: Exposure, client_ip: str, authenticated: bool) -> bool:
    """Whether this client may have a pool key (`authenticated`: proxyauth or a client token)."""
    if exp.state == "exposed":
        return False
    if is_loopback(client_ip):
        return True
    return exp.state == "remote_ok" and authenticated


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
