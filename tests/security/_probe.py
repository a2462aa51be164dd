"""A hostile client, in raw HTTP: tunnels and requests exactly as written, nothing a library
would tidy up. Used in-process for loopback clients and, as a script, inside a network
namespace for remote ones (`python _probe.py PROBES_JSON`, one JSON result per probe).

A probe is a dict: `proxy` [host, port]; `connect` "target:port" (optional); `auth`
"user:pass" for Proxy-Authorization (optional); `request` the raw request to send, through the
tunnel when there is one. The result: `connect` (the tunnel's status, 0 when none was asked or
it failed), `status` and `body` of the request's answer (0 and "" when none), `error`.
"""

from __future__ import annotations

import base64
import json
import socket
import sys
from typing import Any

TIMEOUT = 15.0


def _read_head(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def _read_body(s: socket.socket, headers: dict[str, str], rest: bytes) -> bytes:
    if "content-length" in headers:
        want = int(headers["content-length"])
        while len(rest) < want:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        return rest[:want]
    while chunk := s.recv(65536):  # Connection: close
        rest += chunk
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out, data = b"", rest
        while data:
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out, data = out + data[:size], data[size + 2 :]
        return out
    return rest


def probe(p: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"connect": 0, "status": 0, "body": "", "error": None}
    try:
        with socket.create_connection(tuple(p["proxy"]), timeout=TIMEOUT) as s:
            s.settimeout(TIMEOUT)
            auth = ""
            if p.get("auth"):
                token = base64.b64encode(p["auth"].encode()).decode()
                auth = f"Proxy-Authorization: Basic {token}\r\n"
            if p.get("connect"):
                target = p["connect"]
                s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode())
                status, headers, rest = _read_head(s)
                result["connect"] = status
                if status != 200:
                    result["body"] = _read_body(s, headers, rest).decode("utf-8", "replace")
                    return result
                auth = ""
            if p.get("request"):
                raw = p["request"]
                if auth:
                    raw = raw.replace("\r\n", f"\r\n{auth}", 1)
                s.sendall(raw.encode())
                status, headers, rest = _read_head(s)
                result["status"] = status
                result["body"] = _read_body(s, headers, rest).decode("utf-8", "replace")
    except OSError as e:
        result["error"] = f"{type(e).__name__}: {e}"
    return result


def get(url: str, host: str, extra: str = "") -> str:
    """A raw GET of `url` (absolute or a path) with the Host given, closing after."""
    return (
        f"GET {url} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer client-own\r\n"
        f"{extra}Connection: close\r\n\r\n"
    )


if __name__ == "__main__":
    print(json.dumps([probe(p) for p in json.loads(sys.argv[1])]))
