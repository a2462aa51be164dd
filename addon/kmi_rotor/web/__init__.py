"""Live status page and Prometheus metrics, as a WSGI application fed by a snapshot callable.

``make_app(snapshot, prefix="")`` serves ``/`` (HTML page), ``/api/status`` (the snapshot as
JSON) and ``/metrics`` (Prometheus text format) under ``prefix``.
"""

from __future__ import annotations

from .app import make_app

__all__ = ["make_app"]
