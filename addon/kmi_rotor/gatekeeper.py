"""Who may use the proxy: the exposure check at start and each client's admission.

The decisions are in `core/access.py`; this shell reads mitmproxy's options and the flow.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, http
from mitmproxy.proxy.mode_specs import ProxyMode

from .config import Client, Pool, Settings
from .core import access
from .core.credentials import CREDENTIAL_HEADERS, CREDENTIAL_QUERY
from .core.secrets import mask_credential_value
from .flows import META

log = logging.getLogger("kmi_rotor")

EXPOSURE_OPTIONS = {"listen_host", "mode", "proxyauth", "rotor_allow_remote", "rotor_config"}


class Gatekeeper:
    """Loopback clients, and remote ones once authenticated (proxyauth or a client token)."""

    settings: Settings | None
    exposure: access.Exposure

    def _check_exposure(self) -> None:
        """Decide from the listening addresses and the authentication whom to serve; say it once."""
        opts = ctx.options
        try:
            hosts = [ProxyMode.parse(m).listen_host(opts.listen_host) for m in opts.mode]
        except ValueError:  # mitmproxy refuses a bad mode itself; until then assume the worst
            hosts = [""]
        proxyauth = opts.proxyauth if "proxyauth" in opts else None
        authenticated = bool(proxyauth) or bool(self.settings and self.settings.clients)
        exp = access.exposure(hosts, opts.rotor_allow_remote, authenticated)
        if exp.message and exp != self.exposure:
            log.warning("%s", exp.message)
        self.exposure = exp

    def _client_allowed(self, flow: http.HTTPFlow, pool: Pool | None) -> bool:
        peer = flow.client_conn.peername[0] if flow.client_conn.peername else ""
        authenticated = "proxyauth" in flow.metadata
        if (
            not authenticated
            and self.settings
            and self.settings.clients
            and not access.is_loopback(peer)
        ):
            client = self._token_client(flow)
            authenticated = client is not None and (
                pool is None or client.pools is None or pool.name in client.pools
            )
            if authenticated:
                flow.metadata.setdefault(META, {})["client"] = client.label  # type: ignore[union-attr]
        return access.client_allowed(self.exposure, peer, authenticated)

    def _scrub_tokens(self, flow: http.HTTPFlow) -> None:
        """Mask client tokens wherever the client put them: a flow answered locally (a
        refusal, the status page) keeps its request, and so would keep the token."""
        if self.settings is None or not self.settings.clients:
            return
        tokens = [(c.label, c.token.get_secret_value()) for c in self.settings.clients]
        for slot in (*CREDENTIAL_HEADERS, *(f"?{q}" for q in CREDENTIAL_QUERY)):
            where = flow.request.query if slot.startswith("?") else flow.request.headers
            value = where.get(slot.lstrip("?"))
            if value is None:
                continue
            bare = value[7:].strip() if value[:7].lower() == "bearer " else value.strip()
            if access.match_token([bare], tokens) is not None:
                where[slot.lstrip("?")] = mask_credential_value(value)

    def _token_client(self, flow: http.HTTPFlow) -> Client | None:
        assert self.settings is not None
        headers = {k.lower(): v for k, v in flow.request.headers.items()}
        presented = access.presented_credentials(headers, dict(flow.request.query.items()))
        tokens = [(c.label, c.token.get_secret_value()) for c in self.settings.clients]
        label = access.match_token(presented, tokens)
        return next((c for c in self.settings.clients if c.label == label), None)
