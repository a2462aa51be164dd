"""Where this proxy listens, as mitmproxy's running servers say: for `<state_dir>/proxy.json`,
the destination check (no connection to the proxy itself) and the cluster's registry."""

from __future__ import annotations

from typing import Any

from mitmproxy import ctx, http


def servers() -> Any:
    """mitmproxy's running servers (their modes and addresses); () outside a running proxy."""
    server = ctx.master.addons.get("proxyserver") if hasattr(ctx, "master") else None
    return getattr(server, "servers", ())


def ports(flow: http.HTTPFlow | None = None) -> set[int]:
    """Every port the proxy listens on (several modes may share one process), and the one
    `flow`'s client connected to."""
    found: set[int] = set()
    for instance in servers() or ():
        found.update(int(a[1]) for a in instance.listen_addrs)
    if flow is not None and flow.client_conn.sockname:
        found.add(int(flow.client_conn.sockname[1]))
    return found


def address() -> str:
    """Where this proxy listens, as bound (a port 0 resolved); "" before it listens."""
    try:
        server = ctx.master.addons.get("proxyserver")
        addrs = server.listen_addrs() if server is not None else []
        if addrs:
            host, port = addrs[0][0], addrs[0][1]
            return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
        port = ctx.options.listen_port
        return f"{ctx.options.listen_host or '*'}:{port}" if port else ""
    except (AttributeError, KeyError, IndexError, TypeError):
        return ""
