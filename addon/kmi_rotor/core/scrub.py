"""Upstream text made safe to keep: every configured secret taken out, and the length capped.

An upstream may echo what it was sent (a key, a client token) in an error message, an in-stream
`event: error` or a header. Before such text is written down (state file, status, logs, flows)
a `Scrubber` replaces each secret in its obvious forms (as is, percent-encoded, hex, base64 and
URL-safe base64 at any alignment) and the start of one cut off at the end of a truncated text.
Control characters go too, so a message cannot forge log lines.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from collections.abc import Iterable

REDACTED = "[redacted]"
DEFAULT_LIMIT = 200
_PROBE = 6
"""Characters that index a form; also the shortest cut-off start of a secret that is redacted."""
_MIN_SECRET = 8
"""Shorter values are no secrets worth hunting (and would redact ordinary words)."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_TAIL = re.compile(r"[A-Za-z0-9+/=_%.~-]+$")


def forms(secret: str) -> set[str]:
    """The ways `secret` can appear in text, each long enough to be told from chance."""
    raw = secret.encode("utf-8")
    out = {secret, urllib.parse.quote(secret, safe="")}
    hexed = binascii.hexlify(raw).decode()
    out |= {hexed, hexed.upper()}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        for shift in range(3):
            text = encode(b"\0" * shift + raw).decode().rstrip("=")
            # Drop the characters that mix in the neighbours' bits: the stable middle remains.
            start = 4 if shift else 0
            end = len(text) - (len(text) % 4 or 4) if (shift + len(raw)) % 3 else len(text)
            out.add(text[start:end])
    return {f for f in out if len(f) >= _MIN_SECRET}


class Scrubber:
    """Takes configured secrets out of text; built once per configuration, then cheap per call
    (a dictionary look-up per character, whatever the number of secrets)."""

    def __init__(self, secrets: Iterable[str], limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._index: dict[str, list[str]] = {}
        for s in secrets:
            if len(s) < _MIN_SECRET:
                continue
            for f in forms(s):
                self._index.setdefault(f[:_PROBE], []).append(f)
        for found in self._index.values():
            found.sort(key=len, reverse=True)  # the longest form wins where several match

    def __call__(self, text: str | None, limit: int | None = None) -> str:
        """`text` without any secret or control character, at most `limit` characters."""
        if not text:
            return ""
        text = _CONTROL.sub(" ", text)
        cap = self.limit if limit is None else limit
        # Scrubbed before it is cut: a secret split by the cut would not be found whole.
        text = self._cut_off_start(self._replace(text))
        if len(text) > cap:
            text = self._cut_off_start(text[: max(0, cap - 1)]) + "…"
        return text

    def _replace(self, text: str) -> str:
        if not self._index:
            return text
        out: list[str] = []
        i = last = 0
        while i <= len(text) - _PROBE:
            match = next(
                (f for f in self._index.get(text[i : i + _PROBE], ()) if text.startswith(f, i)),
                None,
            )
            if match is None:
                i += 1
                continue
            out += [text[last:i], REDACTED]
            i = last = i + len(match)
        out.append(text[last:])
        return "".join(out)

    def _cut_off_start(self, text: str) -> str:
        """Redact a run at the very end that is the start of a secret (a text cut short)."""
        run = _TAIL.search(text)
        if run is None or not self._index:
            return text
        for j in range(run.start(), len(text) - _PROBE + 1):
            tail = text[j:]
            if any(f.startswith(tail) for f in self._index.get(tail[:_PROBE], ())):
                return text[:j] + REDACTED
        return text


def only_own_words(text: str, limit: int = 80) -> str:
    """A reason that may be shown to any client: the text up to the first place it quotes
    something (mitmproxy quotes the bytes an upstream sent in some errors), capped."""
    cut = re.split(r"""['"`]|\bb'|:\s*b""", _CONTROL.sub(" ", text), maxsplit=1)[0]
    cut = cut.strip(" :") or "network error"
    return cut if len(cut) <= limit else cut[: limit - 1] + "…"
