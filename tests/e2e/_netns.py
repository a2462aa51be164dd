"""Clients that are not on loopback: a network namespace of the test's own, joined to this
machine by a veth pair on a private /30 (10.231.0.0/16, addresses that exist only in here).

Also a mitmdump launcher that does not force `--listen-host 127.0.0.1`, and curl run from
either side. Needs root (or CAP_NET_ADMIN) and iproute2; without them the caller skips, except
under CI where a missing namespace must fail rather than silently test nothing.
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
from proctools import MITMDUMP, ROOT, Mitmdump, clean_env, spawn

SUPERNET = ipaddress.ip_network("10.231.0.0/16")
LISTEN_PORT_RE = re.compile(r"listening at .*:(\d+)\.?\s*$")


@dataclass(frozen=True)
class Netns:
    """A namespace `name` whose only way out is `ns_ip` -> `host_ip` over a veth pair."""

    name: str
    host_if: str
    host_ip: str
    ns_ip: str

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = _ip("-o", "-4", "addr", "show").stdout
    return [
        ipaddress.ip_interface(m).network for m in re.findall(r"inet (\d+\.\d+\.\d+\.\d+/\d+)", out)
    ]


def _free_slash30(rng: random.Random) -> ipaddress.IPv4Network:
    """A /30 of SUPERNET that no interface of this machine overlaps."""
    used = _used_networks()
    for _ in range(200):
        base = int(SUPERNET.network_address) + 4 * rng.randrange(SUPERNET.num_addresses // 4)
        net = ipaddress.ip_network(f"{ipaddress.ip_address(base)}/30")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free /30 in 10.231.0.0/16")


def _unavailable(why: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"network namespaces are required under CI: {why}")
    pytest.skip(f"cannot create a network namespace: {why}")


def _setup(ns: Netns, ns_if: str, prefix: int) -> None:
    steps = [
        ("link", "add", ns.host_if, "type", "veth", "peer", "name", ns_if),
        ("link", "set", ns_if, "netns", ns.name),
        ("addr", "add", f"{ns.host_ip}/{prefix}", "dev", ns.host_if),
        ("link", "set", ns.host_if, "up"),
        ("-n", ns.name, "addr", "add", f"{ns.ns_ip}/{prefix}", "dev", ns_if),
        ("-n", ns.name, "link", "set", ns_if, "up"),
        ("-n", ns.name, "link", "set", "lo", "up"),
    ]
    for step in steps:
        r = _ip(*step)
        if r.returncode != 0:
            raise RuntimeError(f"ip {' '.join(step)}: {r.stderr.strip()}")


@contextmanager
def netns() -> Iterator[Netns]:
    """Create the namespace and its link; both are removed on exit, whatever happened."""
    rng = random.Random()
    tag = f"{rng.getrandbits(32):08x}"
    name = f"kmirot-{tag}"
    net = _free_slash30(rng)
    host_ip, ns_ip = (str(h) for h in net.hosts())
    try:
        made = _ip("netns", "add", name)
    except FileNotFoundError:
        made = None
    if made is None:
        _unavailable("the `ip` command (iproute2) is not installed")
    elif made.returncode != 0:
        _unavailable(made.stderr.strip() or f"ip netns add exited {made.returncode}")
    ns = Netns(name, f"vk{tag}", host_ip, ns_ip)
    try:
        try:
            _setup(ns, f"vn{tag}", net.prefixlen)
        except RuntimeError as e:  # e.g. veth pairs not permitted where namespaces are
            _unavailable(str(e))
        yield ns
    finally:
        _ip("link", "del", ns.host_if)  # takes its peer with it
        _ip("netns", "del", name)


# -- processes -------------------------------------------------------------------------------


def start_proxy(
    config: Path,
    confdir: Path,
    upstream_ca: Path,
    log_path: Path,
    *,
    listen_host: str | None,
    mode: str = "regular",
    extra: Sequence[str] = (),
) -> Mitmdump:
    """mitmdump with the addon on a free port; `listen_host=None` keeps mitmproxy's default
    (every interface). `host` of the result is 127.0.0.1: the address loopback clients use."""
    argv = [MITMDUMP, "-p", "0", "--mode", mode, "--set", f"confdir={confdir}"]
    if listen_host is not None:
        argv += ["--listen-host", listen_host]
    argv += [
        "--set",
        f"rotor_config={config}",
        "--set",
        f"ssl_verify_upstream_trusted_ca={upstream_ca}",
        "-s",
        str(ROOT / "addon" / "rotor.py"),
        *extra,
    ]
    p = spawn(argv, clean_env(), log_path)
    try:
        m = p.wait_for(LISTEN_PORT_RE)
    except BaseException:
        p.stop()
        raise
    return Mitmdump(p, "127.0.0.1", int(m.group(1)))


@dataclass(frozen=True)
class Answer:
    status: int
    """The HTTP status of the answer (0 when none came), or the CONNECT's when it failed."""
    connect: int
    body: str
    exit_code: int


def curl(args: Sequence[str], ns: Netns | None = None, timeout: float = 30) -> Answer:
    """Run curl (inside `ns` when given) and read the status codes it reports."""
    argv = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code} %{http_connect}", *args]
    out = subprocess.run(
        ns.argv(argv) if ns else argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
    )
    body, _, codes = out.stdout.rpartition("\n")
    status, _, connect = codes.partition(" ")
    return Answer(int(status or 0), int(connect or 0), body, out.returncode)


__all__ = ["Answer", "Netns", "curl", "netns", "start_proxy"]
