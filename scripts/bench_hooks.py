"""kmi-rotor's own CPU per request, in process: its hooks driven through mitmproxy's test
helpers, without a proxy, sockets or other processes, so that a shared machine's noise hardly
touches it. What `bench_overhead.py` measures end to end, this isolates to the addon.

A configured addon (one pool, `--keys` keys, the `--provider` preset, openai by default) sees
`--requests` flows of a small chat request through `requestheaders`, `request`,
`responseheaders` and `response`, answered 200 with that provider's own rate-limit headers
as `fake_provider.py` sends them (OpenAI's for a provider without its own dialect; or, with
`--stream`, an SSE stream of `--events` events fed through the stream tap). Reported: CPU µs
per request in the hooks (best of `--rounds`), and per event for streams. Requests and answers
are built before the clock starts, and bodies are stored as mitmproxy stores them
(`.data.content`), so the figure is the hooks' work alone.

In that tight loop the hooks find their code and data in the CPU's caches. In a busy proxy
they do not: between two hooks of a flow, mitmproxy works on this and other flows, and the
hooks cost about twice as much there (`hook_timer.py`). `--evict MB` measures that too: each
hook on its own clock, in rounds that alternate between the warm loop and one that copies MB
of memory before every hook (which pushes the hooks' lines out of the per-core caches), and
reports both, hook by hook (with `--stream`, the tap's work on the events, which runs between
two hooks, is left out of these). What the cold figure adds over the warm one is what the hooks'
footprint costs: the code they run and the objects they touch, not the instructions alone.

    .venv/bin/python scripts/bench_hooks.py [--keys 2] [--stream] [--events 50] [--provider openai]
        [--evict 4]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "addon", ROOT / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench_load import RATE_HEADERS, chat_body, stream_answer  # noqa: E402
from mitmproxy import http  # noqa: E402
from mitmproxy.test import taddons, tflow, tutils  # noqa: E402
from rotor_toml import pool, rotor_config  # noqa: E402

from kmi_rotor.addon import Rotor  # noqa: E402
from kmi_rotor.core.presets import PRESETS  # noqa: E402

HOST = "llm.test"


def _rate_fields(provider: str, wall: float) -> list[tuple[bytes, bytes]]:
    """A success's rate-limit headers in `provider`'s own dialect, as `fake_provider.py` sends
    them (its reset times a minute after `wall`); OpenAI's (`RATE_HEADERS`) for the others."""
    if provider in ("kimi-code", "moonshot", "openrouter"):  # X-RateLimit-*, reset in epoch ms
        reset = str(int((wall + 60) * 1000))
        lines = [("X-RateLimit-Limit", "1000000"), ("X-RateLimit-Remaining", "999999"),
                 ("X-RateLimit-Reset", reset)]  # fmt: skip
    elif provider == "anthropic":  # anthropic-ratelimit-*, reset in RFC 3339
        at = datetime.fromtimestamp(wall + 60, UTC).isoformat(timespec="seconds")
        at = at.replace("+00:00", "Z")
        lines = []
        for kind, limit in (("requests", 1000000), ("tokens", 100000000)):
            lines += [(f"anthropic-ratelimit-{kind}-limit", str(limit)),
                      (f"anthropic-ratelimit-{kind}-remaining", str(limit - 10)),
                      (f"anthropic-ratelimit-{kind}-reset", at)]  # fmt: skip
    else:
        raw = RATE_HEADERS.decode().strip().split("\r\n")
        lines = [(n, v) for n, _, v in (line.partition(": ") for line in raw)]
    return [(n.encode(), v.encode()) for n, v in lines]


def _answer_headers(stream: bool, provider: str = "openai") -> http.Headers:
    fields = _rate_fields(provider, time.time())
    ctype = b"text/event-stream" if stream else b"application/json"
    return http.Headers([(b"content-type", ctype), *fields])


def make_flow(body: bytes) -> http.HTTPFlow:
    headers = http.Headers(
        [
            (b"authorization", b"Bearer sk-client-placeholder"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
    )
    req = tutils.treq(
        host=HOST, port=443, scheme=b"https", method=b"POST", path=b"/v1/chat/completions",
        headers=headers, content=body,
    )  # fmt: skip
    f = tflow.tflow(req=req)
    f.server_conn.sni = None  # not connected yet, as when the hooks see it in mitmproxy
    f.server_conn.timestamp_tls_setup = None
    f.response = None
    return f


def make_response(stream: bool, provider: str = "openai") -> http.Response:
    """An answer as mitmproxy hands it to `responseheaders`: headers read, body not yet."""
    r = tutils.tresp(status_code=200, headers=_answer_headers(stream, provider), content=b"")
    r.data.content = None
    return r


async def one(
    rotor: Rotor, f: http.HTTPFlow, r: http.Response, answer: bytes, events: list[bytes]
) -> None:
    body, f.request.data.content = f.request.data.content, None
    await rotor.requestheaders(f)
    f.request.data.content = body
    await rotor.request(f)
    f.response = r
    rotor.responseheaders(f)
    stream = r.stream
    if callable(stream):
        for chunk in events:
            stream(chunk)
        stream(b"")
        r.data.content = b""
    else:
        r.data.content = answer  # as mitmproxy stores a body it has read
    await rotor.response(f)


HOOKS = ("requestheaders", "request", "responseheaders", "response")


class Timed:
    """The addon's hooks, as `one` calls them, each on its own clock (thread time, summed
    over the requests); `between` runs before every hook, off the clock. The stream tap's
    work on the events, between `responseheaders` and `response`, is not counted."""

    def __init__(self, rotor: Rotor, between: Callable[[], object]) -> None:
        self.rotor, self.between = rotor, between
        self.spent = dict.fromkeys(HOOKS, 0.0)

    async def requestheaders(self, f: http.HTTPFlow) -> None:
        await self._awaited("requestheaders", f)

    async def request(self, f: http.HTTPFlow) -> None:
        await self._awaited("request", f)

    def responseheaders(self, f: http.HTTPFlow) -> None:
        self.between()
        start = time.thread_time()
        self.rotor.responseheaders(f)
        self.spent["responseheaders"] += time.thread_time() - start

    async def response(self, f: http.HTTPFlow) -> None:
        await self._awaited("response", f)

    async def _awaited(self, name: str, f: http.HTTPFlow) -> None:
        """One of the addon's async hooks, timed (an admission that need not wait does not
        suspend it)."""
        hook = getattr(self.rotor, name)
        self.between()
        start = time.thread_time()
        await hook(f)
        self.spent[name] += time.thread_time() - start


def evicting(mb: float) -> Callable[[], object]:
    """A copy of `mb` MB: run between two hooks, it leaves little of theirs in the per-core
    caches (1 MB of second-level cache per core here), as mitmproxy's own work does."""
    source = bytes(int(mb * 2**20))
    target = bytearray(len(source))

    def evict() -> None:
        target[:] = source

    return evict


def measure_hooks(
    rotor: Rotor, args: argparse.Namespace, between: Callable[[], object]
) -> dict[str, float]:
    """CPU µs per request in each hook, `between` run before each."""
    timed = Timed(rotor, between)
    measure(timed, args)  # type: ignore[arg-type]  # the same hooks, timed
    return {name: spent / args.requests * 1e6 for name, spent in timed.spent.items()}


def _check_served(flows: list[http.HTTPFlow]) -> None:
    bad = [f for f in flows if f.response is None or f.response.status_code != 200]
    if bad:
        raise SystemExit(f"{len(bad)} requests were not served: {bad[0].metadata}")


def _best(runs: list[dict[str, float]]) -> dict[str, float]:
    """The round with the least CPU in all."""
    return min(runs, key=lambda hooks: sum(hooks.values()))


def _split(hooks: dict[str, float]) -> str:
    shown = [f"{name} {hooks[name]:.1f}" for name in HOOKS]
    return f"{sum(hooks.values()):.1f} µs ({', '.join(shown)})"


def measure(rotor: Rotor, args: argparse.Namespace) -> float:
    """CPU µs per request in the hooks (thread time: the trace writer's thread not counted,
    as it is not on the request's path)."""
    body = chat_body(args.stream)
    raw = stream_answer(args.events).split(b"\r\n\r\n", 1)[1] if args.stream else b""
    events = _dechunk(raw) if args.stream else []
    answer = b'{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2}}'
    flows = [make_flow(body) for _ in range(args.requests)]
    responses = [make_response(args.stream, args.provider) for _ in flows]
    clock: Callable[[], float] = time.thread_time

    async def run() -> float:
        start = clock()
        for f, r in zip(flows, responses, strict=True):
            await one(rotor, f, r, answer, events)
        return clock() - start

    spent = asyncio.run(run())
    _check_served(flows)
    return spent / args.requests * 1e6


def _dechunk(raw: bytes) -> list[bytes]:
    out = []
    while raw:
        size, _, rest = raw.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out.append(rest[:n])
        raw = rest[n + 2 :]
    return out


@contextmanager
def configured(keys: int, provider: str) -> Iterator[Rotor]:
    """The addon, configured with one pool of `keys` keys of `provider`, in a throwaway state
    folder; done on the way out."""
    with tempfile.TemporaryDirectory(prefix="bench-hooks-") as d:
        secrets = {f"k{i}": f"sk-bench-hooks-{i:05d}-{'x' * 24}" for i in range(keys)}
        config = rotor_config(
            Path(d) / "rotor.toml",
            Path(d) / "state",
            [pool("p", [HOST], secrets, provider=provider)],
        )
        rotor = Rotor()
        with taddons.context(rotor) as tctx:
            tctx.configure(rotor, rotor_config=str(config))
            try:
                yield rotor
            finally:
                rotor.done()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=2)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--provider", default="openai", choices=sorted(PRESETS))
    parser.add_argument(
        "--evict",
        type=float,
        default=0.0,
        metavar="MB",
        help="also time each hook, warm and with MB of memory copied before every hook",
    )
    args = parser.parse_args(argv)
    if args.evict < 0:
        parser.error("--evict takes a size in MB, 0 or more")
    logging.getLogger("kmi_rotor").setLevel(logging.WARNING)
    with configured(args.keys, args.provider) as rotor:
        best = min(measure(rotor, args) for _ in range(args.rounds))
        warm: list[dict[str, float]] = []
        cold: list[dict[str, float]] = []
        for _ in range(args.rounds if args.evict else 0):  # alternating
            warm.append(measure_hooks(rotor, args, _nothing))
            cold.append(measure_hooks(rotor, args, evicting(args.evict)))
    kind = f"streamed, {args.events + 2} events" if args.stream else "plain"
    who = f"{args.keys} keys, {args.provider}"
    print(f"kmi-rotor hooks, {who}, {kind}: {best:.1f} µs CPU per request")
    if args.stream:
        print(f"  {best / (args.events + 2):.2f} µs per event, the request's own work included")
    if args.evict:
        w, c = _best(warm), _best(cold)
        print(f"  hook by hook, warm: {_split(w)}")
        print(f"  with {args.evict:g} MB copied before each hook: {_split(c)}")
        print(f"  cold / warm: {sum(c.values()) / sum(w.values()):.2f}")
    return 0


def _nothing() -> None:
    pass


if __name__ == "__main__":
    sys.exit(main())
