"""A process's share of limits meant for a whole cluster, when it must enforce them alone."""

from __future__ import annotations

from dataclasses import fields

from .limiter import Limits


def scaled(limits: Limits, processes: int) -> Limits:
    """Each limit divided by the number of live processes, rounded down but at least 1, so
    that together they stay within the limit (a limit below the process count gives each
    process 1: the only share that still serves). `processes` below 1 counts as 1."""
    n = max(1, processes)
    values = {}
    for f in fields(limits):
        value = getattr(limits, f.name)
        values[f.name] = None if value is None else max(1, value // n)
    return Limits(**values)
