"""Child processes for tests, benchmarks and the demo: mitmdump with the addon, waited on by readiness lines."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MITMDUMP = str(BIN / "mitmdump")
LISTEN_RE = re.compile(r"listening at (?:http://)?\[?([0-9a-f.:]+)\]?:(\d+)")


def wait_until[T](
    probe: Callable[[], T], timeout: float = 10.0, what: str = "condition", interval: float = 0.02
) -> T:
    """The first truthy result of `probe`, polled every `interval` seconds; AssertionError
    naming `what` (and the last result) once `timeout` seconds have passed without one.

    The one way tests and scripts wait on a condition: poll it, never sleep a fixed time."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout}s: {what} (last: {result!r})")
        time.sleep(interval)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child: no proxy settings or CA bundles inherited from this machine."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not re.match(
            r"(?i)^(https?_proxy|all_proxy|no_proxy|ssl_cert_file|ssl_cert_dir|requests_ca_bundle|"
            r"curl_ca_bundle|kmi_rotor_config)$",
            k,
        )
    }
    env.update(extra)
    return env


@dataclass
class Process:
    """A child whose output is collected line by line (and kept in a file for leak checks)."""

    proc: subprocess.Popen[str]
    log_path: Path
    lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with self.log_path.open("a", encoding="utf-8") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Block until a line matches (or fail with the output so far if the process died)."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                if self.proc.poll() is not None and not self._pump_alive():
                    raise RuntimeError(
                        f"process exited ({self.proc.returncode}) before {rx.pattern!r}:\n"
                        + "\n".join(self.lines[-30:])
                    )
                if not self._cond.wait(timeout):
                    raise TimeoutError(
                        f"no line matching {rx.pattern!r} within {timeout}s:\n"
                        + "\n".join(self.lines[-30:])
                    )

    def _pump_alive(self) -> bool:
        return any(
            t.name == f"pump-{self.proc.pid}" and t.is_alive() for t in threading.enumerate()
        )

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for t in threading.enumerate():
            if t.name == f"pump-{self.proc.pid}":
                t.join(5)
        return self.proc.returncode


def spawn(
    argv: Sequence[str], env: dict[str, str], log_path: Path, cwd: Path | None = None
) -> Process:
    proc = subprocess.Popen(
        list(argv),
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
        bufsize=1,
    )
    p = Process(proc, log_path)
    threading.Thread(target=p._pump, name=f"pump-{proc.pid}", daemon=True).start()
    return p


@dataclass
class Mitmdump:
    process: Process
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        return self.process.stop(sig)


def start_mitmdump(
    config: Path,
    confdir: Path,
    log_path: Path,
    *,
    mode: str = "regular",
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Mitmdump:
    """mitmdump with the addon on 127.0.0.1 and a free port, once it says it is listening."""
    argv = [
        MITMDUMP,
        "--listen-host",
        "127.0.0.1",
        "-p",
        "0",
        "--mode",
        mode,
        "--set",
        f"confdir={confdir}",
        "--set",
        f"rotor_config={config}",
        "-s",
        str(ROOT / "addon" / "rotor.py"),
        *extra,
    ]
    p = spawn(argv, env if env is not None else clean_env(), log_path)
    try:
        m = p.wait_for(LISTEN_RE)
    except BaseException:
        p.stop()
        raise
    return Mitmdump(p, m.group(1), int(m.group(2)))
