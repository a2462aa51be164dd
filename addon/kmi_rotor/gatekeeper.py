"""Who may use the proxy, and where a key may go: the shell around `core/access.py` and
`core/routing.py`.

A part of kmi-rotor's addon, which calls its hooks: it reads mitmproxy's options and flows
and applies the core's verdicts in `configure` (whom to serve, from the listening
addresses and the authentication), `http_connect` (who may open a tunnel, and to where),
`server_connect` (no connection to the proxy itself, whatever the spelling) and
`tls_start_server` (the upstream server name of a pool host is the pool's host); and in
`gate`, which kmi-rotor's `requestheaders` asks first (who may have what a request asks for,
and whether its Host names the pool's host).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from mitmproxy import ctx, http
from mitmproxy.net.http import url
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode

from . import listening
from .answers import answer_locally
from .config import Client, Pool, Settings
from .core import access, routing
from .core.access import IP
from .core.calls import is_api_call
from .core.credentials import CREDENTIAL_HEADERS, CREDENTIAL_QUERY
from .core.header_fields import (
    Fields,
    field_positions,
    field_value,
    has_field,
    with_field_at,
    with_fields,
)
from .core.hosts import HostLookup
from .core.refusal import Refusal
from .core.secrets import mask_credential_value
from .hosting import AUTHORITY_VERSIONS, WEB_HOST, StatusPage, authority_text, host_header
from .masking import drop_credentials
from .names import ALLOW_REMOTE_OPTION, CONFIG_OPTION, META
from .request_body import header_values

log = logging.getLogger("kmi_rotor")

EXPOSURE_OPTIONS = {"listen_host", "mode", "proxyauth", ALLOW_REMOTE_OPTION, CONFIG_OPTION}
RESOLVE_TIMEOUT = 10.0


class _Where:
    """The request's destination is to be checked (`Gatekeeper._where`)."""


_WHERE = _Where


class Gatekeeper:
    """Loopback clients, and remote ones once authenticated (proxyauth or a client token);
    keys only to their pool's host."""

    def __init__(
        self,
        page: StatusPage,
        settings: Callable[[], Settings | None],
        not_serving: Callable[[], str | None],
        clock: Callable[[], float],
    ) -> None:
        """`settings`: the configuration in force (None: none applies, and `not_serving`
        says why); `page`: the status page, which it lets through to whom may see it."""
        self.page = page
        self._settings = settings
        self._not_serving = not_serving
        self.clock = clock
        self.exposure = access.Exposure("local")
        self._listen_hosts: tuple[str, ...] = ()
        self._pools: HostLookup[tuple[Pool | None, bool]] | None = None
        """The pool of each host:port, and whether it allows keys over plain HTTP there,
        remembered for the configuration in force."""
        self._verdicts: dict[tuple[str | None, str, Any], str | None] = {}
        self._verdicts_source: tuple[Settings | None, tuple[str, ...]] | None = None
        """Reverse-mode Host verdicts, for the configuration and listening addresses they
        were worked out with."""
        self._upstreams: dict[Any, str] = {}
        """The upstream's authority of each reverse mode, what the Host becomes."""
        self._owns_host_header = False
        """True when kmi-rotor turned on keep_host_header to see reverse-mode clients' own Host
        (mitmproxy would replace it before any hook), and so rewrites it itself afterwards."""

    @property
    def settings(self) -> Settings | None:
        return self._settings()

    # -- start-up -------------------------------------------------------------------------

    def configure(self, updated: set[str]) -> None:
        # Called after kmi-rotor's own `configure`: the configuration's client tokens count
        # as authentication.
        if updated & EXPOSURE_OPTIONS:
            self.check_exposure()

    def check_exposure(self) -> None:
        """Decide from the listening addresses and the authentication whom to serve; say it once."""
        opts = ctx.options
        try:
            modes = [ProxyMode.parse(m) for m in opts.mode]
            hosts = [m.listen_host(opts.listen_host) for m in modes]
        except ValueError:  # mitmproxy refuses a bad mode itself; until then assume the worst
            modes, hosts = [], [""]
        self._listen_hosts = tuple(hosts)
        proxyauth = opts.proxyauth if "proxyauth" in opts else None
        settings = self.settings
        authenticated = bool(proxyauth) or bool(settings and settings.clients)
        exp = access.exposure(hosts, getattr(opts, ALLOW_REMOTE_OPTION), authenticated)
        if exp.message and exp != self.exposure:
            log.warning("%s", exp.message)
        self.exposure = exp
        reverse = any(isinstance(m, ReverseMode) for m in modes)
        if reverse and not opts.keep_host_header:
            self._owns_host_header = True
            opts.update(keep_host_header=True)

    # -- hooks ----------------------------------------------------------------------------

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """A tunnel: who may open it, and whether its destination is allowed."""
        if flow.response is not None:  # proxyauth answered already
            return
        try:
            pool = self._pool_of(flow.request.host, flow.request.port)
            kind: access.Kind = "connect_pool" if pool is not None else "other"
            loopback = _client_loopback(flow)
            refusal = self._who(flow, kind, pool, loopback, self.settings) or await self._where(
                flow, flow.request.host, flow.request.port, pool, loopback, everyone=True
            )
        except Exception:
            log.exception("kmi-rotor: internal error while checking a tunnel")
            refusal = Refusal(500, "internal_error", "failed while checking the tunnel")
        if refusal is not None:
            answer_locally(flow, refusal, self.clock())

    async def server_connect(self, data) -> None:  # type: ignore[no-untyped-def]
        """The last word before any connection leaves: never to the proxy itself, and for a
        client not on loopback never to this machine; its address is pinned to what was
        checked (a name that resolves again could answer otherwise)."""
        server = data.server
        if server.address is None or server.error:
            return
        host, port = server.address[0], server.address[1]
        peer = data.client.peername[0] if data.client.peername else ""
        loopback = access.is_loopback(peer)
        pool = self._pool_of(host, port)
        try:
            addresses = await _resolve(host, port)
        except (OSError, TimeoutError):
            if not loopback:
                server.error = f"kmi-rotor: the destination {host}:{port} cannot be resolved"
            return  # for loopback clients, mitmproxy fails to connect itself and says why
        why = access.destination_verdict(
            addresses,
            port,
            client_loopback=loopback,
            pool_host=pool is not None,
            listen_ports=self.listen_ports(),
            own=_OWN,
        )
        if why is not None:
            server.error = f"kmi-rotor: {why}"
            return
        if not loopback and pool is None and access.parse_address(host) is None and addresses:
            if server.sni is None:
                server.sni = host  # the name still goes in the handshake, not the address
            server.address = (str(addresses[0]), port)

    def tls_start_server(self, data) -> None:  # type: ignore[no-untyped-def]
        """Runs before mitmproxy's own TLS set-up (scripts come first): the server name of a
        connection to a pool host is that host, whatever name the client's handshake gave."""
        conn = data.conn
        if conn.address is None:
            return
        if self._pool_of(conn.address[0], conn.address[1]) is not None:
            conn.sni = routing.canonical_host(conn.address[0])
            return
        mode = data.context.client.proxy_mode
        if (
            self._owns_host_header
            and isinstance(mode, ReverseMode)
            and conn.address == mode.address
        ):
            conn.sni = mode.address[0]  # what mitmproxy does without keep_host_header

    # -- the request path -----------------------------------------------------------------

    def gate(self, flow: http.HTTPFlow) -> Pool | Coroutine[Any, Any, Pool | None] | None:
        """Access, Host, configuration and route checks; the pool when a key must be chosen.
        A request that fails one is answered locally; client tokens are masked in any case.
        Decided at once, but for a client not on loopback, whose destination is resolved
        first: then a coroutine to await for the same answer (no coroutine for every
        request)."""
        req = flow.request
        # A replay (a failover attempt, or the operator's in mitmweb) is made by the proxy from
        # a flow that passed these checks; its Host is the upstream's already.
        replay = flow.is_replay == "request"
        settings = self.settings  # read once: nothing here waits (`_gate_where` reads it anew)
        refusal = None if replay else self._reverse_host(flow, settings)
        page = self.page.should_serve(flow)
        entry = self._pool_entry(req.data.host, req.data.port, settings)  # `req.host`, `.port`
        pool = None if entry is None else entry[0]
        if refusal is None:
            plain = None if entry is None else entry[1]
            refusal = self._refusal_before(flow, page, pool, replay, settings)
            if refusal is _WHERE:  # a client not on loopback: where it goes, then the rest
                return self._gate_where(flow, page, pool, plain)
            if refusal is None:
                refusal = self._refusal_after(flow, page, pool, plain, settings)
        return self._gated(flow, page, pool, refusal, settings)

    async def _gate_where(
        self, flow: http.HTTPFlow, page: bool, pool: Pool | None, plain: bool | None
    ) -> Pool | None:
        """`gate` for a client not on loopback, once `_refusal_before` passed: where the
        request goes, then the checks after it."""
        req = flow.request
        refusal = await self._where(flow, req.host, req.port, pool, False, everyone=False)
        settings = self.settings  # a configuration may have come meanwhile
        if refusal is None:
            refusal = self._refusal_after(flow, page, pool, plain, settings)
        return self._gated(flow, page, pool, refusal, settings)

    def _gated(
        self,
        flow: http.HTTPFlow,
        page: bool,
        pool: Pool | None,
        refusal: Refusal | None,
        settings: Settings | None,
    ) -> Pool | None:
        """`gate`'s end, its checks done: tokens masked, a refusal answered, and the pool
        unless the request is the status page's, of no pool, or no API call."""
        self._scrub_tokens(flow, settings)
        if refusal is not None:
            answer_locally(flow, refusal, self.clock())
            return None
        if page or pool is None:
            return None
        req = flow.request
        if not _api_call(req.data.method, req.data.path.split(b"?", 1)[0]):
            drop_credentials(flow)  # a probe needs no key, and the client's own never leaves
            flow.comment = "kmi-rotor: not an API call, sent without a key"
            return None
        return pool

    def _refusal_before(
        self,
        flow: http.HTTPFlow,
        page: bool,
        pool: Pool | None,
        replay: bool,
        settings: Settings | None,
    ) -> Refusal | type[_Where] | None:
        """The first check (after the Host's) that the request fails, of those before where
        it goes: the status page's host, who the client is. `_WHERE` when they pass and the
        destination must be checked next (`_where`: a client not on loopback, no replay);
        then, or when this is None, `_refusal_after`. In all, in order: the status page's
        host, who the client is, where it goes, a configuration, the pool's route."""
        if page and not self._page_host_ok(flow):
            why = f"the status page is served on {WEB_HOST} and the proxy's own addresses only"
            return Refusal(403, "host_not_allowed", why)
        if replay:
            return None
        kind: access.Kind = "page" if page else "pool" if pool is not None else "other"
        loopback = _client_loopback(flow)  # asked once, for both checks
        refusal = self._who(flow, kind, pool, loopback, settings)
        if refusal is None and not loopback:  # a loopback client's destination: server_connect
            return _WHERE
        return refusal

    def _refusal_after(
        self,
        flow: http.HTTPFlow,
        page: bool,
        pool: Pool | None,
        plain: bool | None,
        settings: Settings | None,
    ) -> Refusal | None:
        """The checks after where the request goes (see `_refusal_before`): a configuration,
        the pool's route. `plain`: whether `pool` allows keys over plain HTTP at the request's
        host:port, when known (looked up with the pool)."""
        if page:
            return None
        if settings is None:
            return Refusal(503, "not_configured", f"not serving: {self._not_serving()}")
        return None if pool is None else self._route(flow, pool, plain)

    def _who(
        self,
        flow: http.HTTPFlow,
        kind: access.Kind,
        pool: Pool | None,
        loopback: bool,
        settings: Settings | None,
    ) -> Refusal | None:
        """Whether the client may have what it asks for; `loopback`: `_client_loopback(flow)`,
        `settings`: the configuration in force."""
        token = False
        clients = settings.clients if settings else ()
        if kind in ("pool", "page") and clients and not loopback:
            client = self._token_client(flow, clients)
            if client is not None and access.token_allows(
                client.pools, pool.name if pool else None
            ):
                token = True
                flow.metadata.setdefault(META, {})["client"] = client.label
        why = access.client_verdict(
            self.exposure,
            kind,
            loopback=loopback,
            proxyauth="proxyauth" in flow.metadata,
            token=token,
            tokens_configured=bool(clients),
        )
        return None if why is None else Refusal(403, "client_not_allowed", why)

    async def _where(
        self,
        flow: http.HTTPFlow,
        host: str,
        port: int,
        pool: Pool | None,
        loopback: bool,
        *,
        everyone: bool,
    ) -> Refusal | None:
        """The destination check of `server_connect`, answered as a local 403 before anything
        opens: for tunnels from everyone, for requests from clients not on loopback
        (`loopback`: `_client_loopback(flow)`)."""
        if loopback and not everyone:
            return None
        try:
            addresses = await _resolve(host, port)
        except (OSError, TimeoutError):
            if loopback:
                return None  # mitmproxy answers 502 itself
            why = f"the destination {host}:{port} cannot be resolved"
            return Refusal(403, "destination_not_allowed", why)  # and so not checked
        why = access.destination_verdict(
            addresses,
            port,
            client_loopback=loopback,
            pool_host=pool is not None,
            listen_ports=self.listen_ports(flow),
            own=_OWN,
        )
        return None if why is None else Refusal(403, "destination_not_allowed", why)

    def _route(self, flow: http.HTTPFlow, pool: Pool, plain: bool | None = None) -> Refusal | None:
        """The key follows the connection target: Host and authority rewritten to it, or a
        refusal when the request cannot reach the pool's host over an acceptable transport.
        `plain`: `_plain_http_allowed(pool, host, port)` when the caller has it."""
        req = flow.request
        data = req.data
        headers = data.headers
        fields = headers.fields
        hosts = header_values(fields, b"host")
        authority = authority_text(data.authority) if data.authority else ""  # `req.authority`
        host, port = data.host, data.port
        if plain is None:
            plain = self._plain_http_allowed(pool, host, port)
        r = _route(
            req.scheme,
            host,
            port,
            (*hosts, authority) if authority else tuple(hosts),
            flow.server_conn.sni,
            flow.server_conn.tls_established,
            plain,
        )
        if r.refusal is not None:
            return Refusal(*r.refusal)
        if hosts != [r.authority] and (hosts or data.http_version not in AUTHORITY_VERSIONS):
            headers.fields = _host_set(fields, r.authority, bool(hosts))
        if authority:
            data.authority = _authority_bytes(r.authority)  # what `req.authority = ...` stores
        if r.mismatches:
            shown = [routing.canonical_host(v)[:100] for v in r.mismatches]
            flow.metadata.setdefault(META, {})["host_rewritten"] = shown
        return None

    def _reverse_host(self, flow: http.HTTPFlow, settings: Settings | None) -> Refusal | None:
        """Reverse mode: the Host must name this proxy (DNS rebinding); then it becomes the
        upstream's, as mitmproxy would have made it."""
        mode = flow.client_conn.proxy_mode
        if not _is_reverse(mode):
            return None
        req = flow.request
        data = req.data
        at = None
        if data.http_version in AUTHORITY_VERSIONS:
            named = host_header(req)
        else:  # HTTP/1: its Host fields found once, to be read and rewritten
            fields = data.headers.fields
            at = field_positions(fields, b"host")
            if len(at) == 1:  # `host_header(req)`, the usual case
                named = fields[at[0]][1].decode("utf-8", "surrogateescape")
            else:
                named = field_value(fields, b"host")
        local = flow.client_conn.sockname
        scheme = "https" if flow.client_conn.tls else "http"
        why = self._host_verdict(named, scheme, local, settings)
        if why is not None:
            return Refusal(403, "host_not_allowed", why)
        if self._owns_host_header:
            upstream = self._upstreams.get(mode)
            if upstream is None:
                scheme = "https" if mode.scheme in ("https", "http3", "tls", "quic") else "http"
                upstream = url.hostport(scheme, mode.address[0], mode.address[1])
                self._upstreams = {**self._upstreams, mode: upstream}  # a mode per listener
            if named != upstream and at is not None and len(at) == 1:
                # `set_host_header`, on the one Host field found already
                raw = upstream.encode("utf-8", "surrogateescape")
                data.headers.fields = with_field_at(fields, at[0], raw)
            elif named != upstream:
                set_host_header(req, upstream)
        return None

    def _host_verdict(
        self, named: str | None, scheme: str, local: Any, settings: Settings | None
    ) -> str | None:
        """`routing.reverse_host_verdict` for this proxy and `settings`, remembered for the
        addresses and names it depends on (at most `_VERDICTS` of them: a client may send any
        Host)."""
        hosts = self._listen_hosts
        old = self._verdicts_source
        if old is None or old[0] is not settings or old[1] is not hosts:
            self._verdicts, self._verdicts_source = {}, (settings, hosts)
        key = (named, scheme, local)
        try:
            return self._verdicts[key]
        except KeyError:
            pass
        why = routing.reverse_host_verdict(
            named,
            scheme,
            (str(local[0]), int(local[1])) if local else None,
            hosts,
            settings.allowed_hosts if settings else (),
        )
        if len(self._verdicts) >= _VERDICTS:
            self._verdicts = {}
        self._verdicts[key] = why
        return why

    def _page_host_ok(self, flow: http.HTTPFlow) -> bool:
        """The status page under /_kmi-rotor/ of a host a browser page could be from (one the
        user browses to through the proxy) would let that page read it: only the status host,
        pool hosts, loopback, the proxy's own address and allowed names serve it."""
        if isinstance(flow.client_conn.proxy_mode, ReverseMode):
            return True  # the Host was checked already
        req = flow.request
        local = flow.client_conn.sockname
        here = access.parse_address(str(local[0])) if local else None
        allowed = self.settings.allowed_hosts if self.settings else ()

        def ok(name: str) -> bool:
            name = routing.canonical_host(name)
            return (
                name == WEB_HOST
                or self._pool_of(name, req.port) is not None
                or access.names_loopback(name)
                or (here is not None and access.parse_address(name) == here)
                or any(p.matches(name, req.port) for p in allowed)
            )

        return ok(req.host) and ok(req.pretty_host)

    # -- helpers --------------------------------------------------------------------------

    def _pool_of(self, host: str, port: int) -> Pool | None:
        """The pool of host:port, looked up once per configuration."""
        found = self._pool_entry(host, port, self.settings)
        return None if found is None else found[0]

    def _plain_http_allowed(self, pool: Pool, host: str, port: int) -> bool:
        """`pool.plain_http_allowed(host, port)`, remembered with the pool of host:port (for
        a pool of another configuration than the one in force, worked out)."""
        found = self._pool_entry(host, port, self.settings)
        if found is not None and found[0] is pool:
            return found[1]
        return pool.plain_http_allowed(host, port)

    def _pool_entry(
        self, host: str, port: int, settings: Settings | None
    ) -> tuple[Pool | None, bool] | None:
        """`_pool_and_plain(settings, host, port)` for `settings`, the configuration in force,
        looked up once per configuration; None without one."""
        if settings is None:
            return None
        if self._pools is None or self._pools.source is not settings:
            find = functools.partial(_pool_and_plain, settings)
            self._pools = HostLookup(find, source=settings)
        return self._pools(host, port)

    def listen_ports(self, flow: http.HTTPFlow | None = None) -> set[int]:
        """Every port the proxy listens on (several modes may share one process)."""
        return listening.ports(flow)

    def _scrub_tokens(self, flow: http.HTTPFlow, settings: Settings | None) -> None:
        """Mask client tokens wherever the client put them: a flow answered locally (a
        refusal, the status page) keeps its request, and so would keep the token. `settings`:
        the configuration in force."""
        if settings is None or not settings.clients:
            return
        tokens = [(c.label, c.token.get_secret_value()) for c in settings.clients]
        for slot in (*CREDENTIAL_HEADERS, *(f"?{q}" for q in CREDENTIAL_QUERY)):
            where = flow.request.query if slot.startswith("?") else flow.request.headers
            value = where.get(slot.lstrip("?"))
            if value is None:
                continue
            bare = value[7:].strip() if value[:7].lower() == "bearer " else value.strip()
            if access.match_token([bare], tokens) is not None:
                where[slot.lstrip("?")] = mask_credential_value(value)

    def _token_client(self, flow: http.HTTPFlow, clients: tuple[Client, ...]) -> Client | None:
        headers = {k.lower(): v for k, v in flow.request.headers.items()}
        presented = access.presented_credentials(headers, dict(flow.request.query.items()))
        tokens = [(c.label, c.token.get_secret_value()) for c in clients]
        label = access.match_token(presented, tokens)
        return next((c for c in clients if c.label == label), None)


def _pool_and_plain(settings: Settings, host: str, port: int) -> tuple[Pool | None, bool]:
    """The pool of host:port, and whether it allows keys over plain HTTP there."""
    pool = settings.pool_for(host, port)
    return pool, pool is not None and pool.plain_http_allowed(host, port)


_VERDICTS = 256
"""Reverse-mode Host verdicts remembered at most (then forgotten all at once)."""


def set_host_header(req: http.Request, value: str) -> None:
    """`req.host_header = value`: the Host field of an HTTP/1 request written on the raw pairs
    (the first keeps its place and spelling, later ones go, `Host` is appended if there is
    none); HTTP/2 and 3 through mitmproxy's own setter (the :authority, and Host only if there
    is one)."""
    if req.data.http_version in AUTHORITY_VERSIONS:
        req.host_header = value
    else:
        fields = req.data.headers.fields
        req.data.headers.fields = _host_set(fields, value, has_field(fields, b"host"))


_REVERSE: dict[type, bool] = {}


def _is_reverse(mode: ProxyMode) -> bool:
    """`isinstance(mode, ReverseMode)`, by the mode's type, remembered: modes are of an
    abstract class, whose `isinstance` is slow, and of a handful of types."""
    kind = type(mode)
    known = _REVERSE.get(kind)
    if known is None:
        known = _REVERSE[kind] = isinstance(mode, ReverseMode)
    return known


@functools.lru_cache(maxsize=1024)
def _api_call(method: bytes, path: bytes) -> bool:
    """`is_api_call(req.method, req.path)` from the raw method and path, remembered: the same
    few come with every request. Given the path without its query string (what the test
    reads of it), so that no client credential in a query is kept here."""
    text = method.decode("utf-8", "surrogateescape").upper()
    return is_api_call(text, path.decode("utf-8", "surrogateescape"))


def _host_set(fields: Fields, value: str, present: bool) -> Fields:
    """The raw fields after `headers.set_all("Host", [value])`, in one pass (`present`:
    whether they hold a Host field): the first Host field takes the value, keeping its name's
    spelling, later ones go; without one, `Host` is appended."""
    raw = value.encode("utf-8", "surrogateescape")
    return with_fields(fields, {b"host": raw}) if present else (*fields, (b"Host", raw))


@functools.lru_cache(maxsize=1024)
def _authority_bytes(value: str) -> bytes:
    """What `Request.authority = value` stores, remembered (see `hosting.authority_text`)."""
    try:
        return value.encode("idna", "strict")
    except UnicodeError:
        return value.encode("utf8", "surrogateescape")


def _client_loopback(flow: http.HTTPFlow) -> bool:
    """Whether the flow's client connected from a loopback address (no address: it did not)."""
    peer = flow.client_conn.peername[0] if flow.client_conn.peername else ""
    return access.is_loopback(peer)


@functools.lru_cache(maxsize=1024)
def _route(
    scheme: str,
    host: str,
    port: int,
    host_values: tuple[str, ...],
    upstream_sni: str | None,
    upstream_tls_done: bool,
    plain_http_allowed: bool,
) -> routing.Route:
    """`routing.route`, remembered: a pure function of these, and the same few come with
    every request."""
    return routing.route(
        scheme,
        host,
        port,
        host_values=host_values,
        upstream_sni=upstream_sni,
        upstream_tls_done=upstream_tls_done,
        plain_http_allowed=plain_http_allowed,
    )


async def _resolve(host: str, port: int) -> list[IP]:
    """The addresses a connection to host:port would try, without blocking the event loop."""
    literal = access.parse_address(host)
    if literal is not None:
        return [literal]
    if access.names_loopback(host):  # `localhost.` may not resolve here, and yet elsewhere
        return [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(
        loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT
    )
    found: list[IP] = []
    for info in infos:
        ip = access.parse_address(str(info[4][0]))
        if ip is not None and ip not in found:
            found.append(ip)
    return found


def is_own_address(ip: IP) -> bool:
    """Whether `ip` is an address of this machine: one a socket can be bound to. Always
    current (interfaces come and go), one system call; an unexpected error counts as ours
    (fail closed)."""
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((str(ip), 0))
    except OSError as e:
        return e.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EINVAL)
    return True


_OWN = access.OwnAddresses(is_own_address, time.monotonic)
"""One system call per address a second at most, not one per upstream connection."""

__all__ = ["EXPOSURE_OPTIONS", "Gatekeeper", "is_own_address"]
