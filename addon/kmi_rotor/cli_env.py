"""`kmi-rotor env` and `kmi-rotor kimi`: point a shell, or the Kimi CLI, at a running proxy.

Clients in regular mode must trust mitmproxy's CA. Python's httpx (the openai and anthropic SDKs)
and requests REPLACE their trust store with the file they are given, so they get a bundle of the
usual roots plus mitmproxy's CA; Node adds NODE_EXTRA_CA_CERTS to its own roots.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

from .config import DEFAULT_STATE_DIR, ConfigError

CA_NAME = "mitmproxy-ca-cert.pem"


def system_roots() -> str:
    """The roots a combined bundle starts from: certifi's (always there with mitmproxy)."""
    import certifi

    return Path(certifi.where()).read_text(encoding="ascii")


def write_bundle(confdir: Path, bundle: Path) -> Path:
    """Write roots + mitmproxy's CA to `bundle` (0644: certificates are public) and return it."""
    ca = confdir.expanduser() / CA_NAME
    if not ca.is_file():
        raise ConfigError(
            f"{ca} does not exist yet: start the proxy once (scripts/serve) so mitmproxy creates its CA"
        )
    bundle = bundle.expanduser()
    bundle.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = bundle.with_suffix(".tmp")
    tmp.write_text(
        system_roots().rstrip("\n") + "\n" + ca.read_text(encoding="ascii"), encoding="ascii"
    )
    os.replace(tmp, bundle)
    return bundle


def exports(args: argparse.Namespace) -> dict[str, str]:
    confdir = Path(args.confdir).expanduser()
    bundle = write_bundle(confdir, Path(args.bundle))
    proxy = f"http://{args.host}:{args.port}"
    return {
        "HTTPS_PROXY": proxy,
        "https_proxy": proxy,
        "SSL_CERT_FILE": str(bundle),
        "REQUESTS_CA_BUNDLE": str(bundle),
        "NODE_EXTRA_CA_CERTS": str(confdir / CA_NAME),
        "NODE_USE_ENV_PROXY": "1",
    }


def cmd_env(args: argparse.Namespace) -> int:
    for name, value in exports(args).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def cmd_kimi(args: argparse.Namespace) -> int:
    env = {**os.environ, **exports(args)}
    for name in ("NO_PROXY", "no_proxy"):  # the proxy must see the Kimi CLI's requests
        env.pop(name, None)
    exe = shutil.which(args.program)
    if exe is None:
        raise ConfigError(
            f"{args.program!r} is not on PATH (install the Kimi CLI, or pass --program)"
        )
    argv = [exe, *args.args]
    sys.stdout.flush()
    os.execve(exe, argv, env)
    return 0  # not reached


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default="127.0.0.1", help="the proxy's address")
        p.add_argument("--port", type=int, default=8080, help="the proxy's port (regular mode)")
        p.add_argument("--confdir", default="~/.mitmproxy", help="mitmproxy's confdir (its CA)")
        p.add_argument(
            "--bundle",
            default=f"{DEFAULT_STATE_DIR}/ca-bundle.pem",
            help="where to write the CA bundle",
        )

    env = sub.add_parser("env", help="print the exports a shell needs to use the proxy")
    common(env)
    env.set_defaults(func=cmd_env)
    kimi = sub.add_parser("kimi", help="run the Kimi CLI through the proxy")
    common(kimi)
    kimi.add_argument("--program", default="kimi", help="the Kimi CLI executable")
    kimi.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the Kimi CLI")
    kimi.set_defaults(func=cmd_kimi)
