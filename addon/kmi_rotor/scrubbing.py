"""The scrubber of a configuration: every key and client token it holds, masked out of text
that may quote them (built once per settings: one configuration is live at a time)."""

from __future__ import annotations

from .config import Settings
from .core.scrub import Scrubber

_SCRUBBERS: dict[int, tuple[Settings, Scrubber]] = {}


def scrubber(settings: Settings) -> Scrubber:
    """The scrubber of every key and client token of `settings` (built once per settings)."""
    cached = _SCRUBBERS.get(id(settings))
    if cached is not None and cached[0] is settings:
        return cached[1]
    secrets = [k.secret.get_secret_value() for k in settings.keys if not k.problem]
    secrets += [c.token.get_secret_value() for c in settings.clients]
    made = Scrubber(secrets)
    _SCRUBBERS.clear()  # one configuration is live at a time
    _SCRUBBERS[id(settings)] = (settings, made)
    return made
