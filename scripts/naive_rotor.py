"""A deliberately naive key rotor: the baseline of `scripts/bench_strategies.py`, nothing more.

It behaves as a plain rotation script does: every request to one host gets the next key of a
list in blind round-robin order. No health, no limits, no failover, no reading of what the
provider answers: a key that is out of quota or rate-limited keeps getting its turn, and the
provider's 429 goes straight back to the client.

    mitmdump --listen-host 127.0.0.1 -s scripts/naive_rotor.py \\
        --set naive_keys_file=keys.txt --set naive_host=127.0.0.1:8443

`naive_keys_file` holds one key per line (a file, so that keys never show in a process list);
`naive_host` is `host` or `host:port`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http


class NaiveRotor:
    """Blind round-robin: request n gets key n mod len(keys), whatever happened before."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.turn = 0

    def load(self, loader: Any) -> None:
        loader.add_option("naive_keys_file", str, "", "File of keys to rotate, one per line.")
        loader.add_option("naive_host", str, "", "host or host:port whose requests get a key.")

    def configure(self, updated: set[str]) -> None:
        if "naive_keys_file" not in updated or not ctx.options.naive_keys_file:
            return
        try:
            text = Path(ctx.options.naive_keys_file).read_text(encoding="utf-8")
        except OSError as e:
            raise exceptions.OptionsError(f"naive_keys_file: {e.strerror}") from None
        self.keys = [line.strip() for line in text.splitlines() if line.strip()]

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not self.keys or not self._matches(flow.request):
            return
        key = self.keys[self.turn % len(self.keys)]
        self.turn += 1
        flow.request.headers["authorization"] = f"Bearer {key}"

    @staticmethod
    def _matches(request: http.Request) -> bool:
        want = ctx.options.naive_host
        host, _, port = want.partition(":")
        return request.host == host and (not port or request.port == int(port))


addons = [NaiveRotor()]
