"""`kmi-rotor env` and `kmi-rotor kimi`: point a shell, or the Kimi CLI, at a running proxy.

Clients in regular mode must trust mitmproxy's CA. Python's httpx (the openai and anthropic SDKs)
and requests REPLACE their trust store with the file they are given, so they get a bundle of the
usual roots plus mitmproxy's CA; so does curl (Debian's curl reads CURL_CA_BUNDLE, not
SSL_CERT_FILE); Node adds NODE_EXTRA_CA_CERTS to its own roots. The CA is created here when it
is missing, through mitmproxy's own certificate store: the same files the proxy will use.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import config, presence
from .config import DEFAULT_STATE_DIR, ConfigError

CA_NAME = "mitmproxy-ca-cert.pem"
DEFAULT_PORT = 8080
KEY_SIZE = 2048
"""mitmproxy's default `key_size`, so the CA is the one mitmproxy itself would create."""
OWN_OPTIONS = ("--host", "--port", "--confdir", "--bundle", "--program", "--config")
"""`kmi-rotor kimi`'s own options (each takes a value); anything else goes to the Kimi CLI."""


def system_roots() -> str:
    """The roots a combined bundle starts from: certifi's (always there with mitmproxy)."""
    import certifi

    return Path(certifi.where()).read_text(encoding="ascii")


def ensure_ca(confdir: Path) -> Path:
    """mitmproxy's CA certificate in `confdir`, created by mitmproxy's certificate store (as the
    proxy would at its first start) when it is missing."""
    ca = confdir / CA_NAME
    if not ca.is_file():
        from mitmproxy.certs import CertStore

        try:
            CertStore.from_store(confdir, "mitmproxy", KEY_SIZE)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot create mitmproxy's CA in {confdir}: {e}") from None
        print(f"kmi-rotor: created mitmproxy's CA in {confdir}", file=sys.stderr)
    return ca


def write_bundle(confdir: Path, bundle: Path) -> Path:
    """Write roots + mitmproxy's CA to `bundle` (0644: certificates are public) and return it."""
    ca = ensure_ca(confdir.expanduser())
    bundle = bundle.expanduser()
    bundle.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = bundle.with_suffix(".tmp")
    tmp.write_text(
        system_roots().rstrip("\n") + "\n" + ca.read_text(encoding="ascii"), encoding="ascii"
    )
    os.replace(tmp, bundle)
    return bundle


def running_proxy(explicit_config: str | None) -> dict[str, Any] | None:
    """What the running proxy published about itself (its ports), if one runs."""
    try:
        state_dir = config.load(config.find_config(explicit_config), lenient=True).state_dir
    except ConfigError:
        state_dir = Path(DEFAULT_STATE_DIR).expanduser()
    return presence.read(state_dir)


def exports(args: argparse.Namespace) -> dict[str, str]:
    confdir = Path(args.confdir).expanduser()
    bundle = write_bundle(confdir, Path(args.bundle))
    port = args.port or presence.regular_port(running_proxy(args.config)) or DEFAULT_PORT
    proxy = f"http://{args.host}:{port}"
    return {
        "HTTPS_PROXY": proxy,
        "https_proxy": proxy,
        # plain http too, so that the status page at http://kmi-rotor.local/ resolves
        "HTTP_PROXY": proxy,
        "http_proxy": proxy,
        "SSL_CERT_FILE": str(bundle),
        "REQUESTS_CA_BUNDLE": str(bundle),
        "CURL_CA_BUNDLE": str(bundle),
        "NODE_EXTRA_CA_CERTS": str(confdir / CA_NAME),
        "NODE_USE_ENV_PROXY": "1",
    }


# -- Node ------------------------------------------------------------------------------------


def node_env_proxy(version: tuple[int, int, int]) -> str:
    """How far a Node release honours NODE_USE_ENV_PROXY: `all` (fetch and node:http(s): 22.21+
    in the 22 line, 24.5+), `fetch` (24.0 to 24.4: fetch only) or `none`."""
    major, minor = version[0], version[1]
    if major >= 25 or (major == 24 and minor >= 5) or (major == 22 and minor >= 21):
        return "all"
    return "fetch" if major == 24 else "none"


def node_version(exe: str) -> tuple[int, int, int] | None:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.match(r"v(\d+)\.(\d+)\.(\d+)", out.stdout.strip())
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def node_advice(version: tuple[int, int, int], proxy: dict[str, Any] | None) -> str | None:
    """What to tell the user of a Node that ignores the proxy settings (None when it honours
    them): the reverse-mode alternative, with this proxy's reverse addresses when it has any."""
    support = node_env_proxy(version)
    if support == "all":
        return None
    v = "v" + ".".join(map(str, version))
    what = "ignores NODE_USE_ENV_PROXY"
    if support == "fetch":
        what = "honours NODE_USE_ENV_PROXY for fetch() only"
    reverse = [
        (s["spec"], a)
        for s in (proxy or {}).get("servers", [])
        if s.get("mode") == "reverse"
        for a in s.get("addresses", [])[:1]
    ]
    lines = [
        f"# node {v} on PATH {what} (Node 22.21+ and 24.5+ honour it fully): its clients may",
        "# bypass the proxy and reach the provider directly with their own key. For Node clients",
        "# use reverse mode: point the client's base URL at the proxy, no CA needed:",
    ]
    if reverse:
        lines += [f"#   {spec}: http://127.0.0.1:{addr[1]}/..." for spec, addr in reverse]
    else:
        lines += [
            "#   scripts/serve --mode regular@8080 --mode reverse:https://api.kimi.com@8081",
            "#   export OPENAI_BASE_URL=http://127.0.0.1:8081/coding/v1",
        ]
    return "\n".join(lines)


# -- commands --------------------------------------------------------------------------------


def cmd_env(args: argparse.Namespace) -> int:
    for name, value in exports(args).items():
        print(f"export {name}={shlex.quote(value)}")
    node = shutil.which("node")
    version = node_version(node) if node else None
    advice = node_advice(version, running_proxy(args.config)) if version else None
    if advice:
        print(advice, file=sys.stderr)
    return 0


def split_kimi(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """For `kmi-rotor kimi ...`: kmi-rotor's own options (they come first), and the arguments
    for the Kimi CLI (everything from the first other one; a `--` between them is dropped).
    Other commands: (argv, None)."""
    if not argv or argv[0] != "kimi":
        return argv, None
    own, i = ["kimi"], 1
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if arg in ("-h", "--help"):
            own.append(arg)
            i += 1
        elif name in OWN_OPTIONS:
            take = 1 if "=" in arg else 2
            own += argv[i : i + take]
            i += take
        else:
            break
    rest = argv[i:]
    return own, rest[1:] if rest[:1] == ["--"] else rest


def cmd_kimi(args: argparse.Namespace) -> int:
    env = {**os.environ, **exports(args)}
    for name in ("NO_PROXY", "no_proxy"):  # the proxy must see the Kimi CLI's requests
        env.pop(name, None)
    exe = shutil.which(args.program)
    if exe is None:
        raise ConfigError(
            f"{args.program!r} is not on PATH (install the Kimi CLI, or pass --program)"
        )
    sys.stdout.flush()
    os.execve(exe, [exe, *args.args], env)
    return 0  # not reached


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--host", default="127.0.0.1", help="the proxy's address (default: %(default)s)"
        )
        p.add_argument(
            "--port",
            type=int,
            default=None,
            help="the proxy's port, regular mode (default: the running proxy's, else "
            f"{DEFAULT_PORT})",
        )
        p.add_argument(
            "--confdir", default="~/.mitmproxy", help="mitmproxy's confdir (default: %(default)s)"
        )
        p.add_argument(
            "--bundle",
            default=f"{DEFAULT_STATE_DIR}/ca-bundle.pem",
            help="where to write the CA bundle (default: %(default)s)",
        )
        p.add_argument(
            "--config", metavar="PATH", help="config file, to find the running proxy's state"
        )

    env = sub.add_parser(
        "env",
        help="print the exports a shell needs to use the proxy",
        description='Print the exports a shell needs: eval "$(kmi-rotor env)". Creates '
        "mitmproxy's CA if it is missing.",
    )
    common(env)
    env.set_defaults(func=cmd_env)
    kimi = sub.add_parser(
        "kimi",
        help="run the Kimi CLI through the proxy",
        usage="kmi-rotor kimi [OPTIONS] [--] [KIMI ARGUMENTS...]",
        description="Run the Kimi CLI through the proxy. kmi-rotor's own options come first; "
        "every argument from the first other one on goes to the Kimi CLI unchanged "
        "(kmi-rotor kimi -p hello). A `--` ends kmi-rotor's options and is not passed on.",
    )
    common(kimi)
    kimi.add_argument(
        "--program", default="kimi", help="the Kimi CLI executable (default: %(default)s)"
    )
    kimi.set_defaults(func=cmd_kimi, args=[])
