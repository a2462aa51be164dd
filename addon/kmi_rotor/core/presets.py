"""Provider presets: where each provider expects its key, and which hosts it serves."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    hosts: tuple[str, ...]
    header: str
    """Header the key goes into when the client sent no credential of its own."""
    bearer: bool
    """Whether the header carries `Bearer <key>` rather than the bare key."""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("kimi-code", ("api.kimi.com",), "authorization", True),
        Preset("moonshot", ("api.moonshot.ai", "api.moonshot.cn"), "authorization", True),
        Preset("openai", ("api.openai.com",), "authorization", True),
        Preset("anthropic", ("api.anthropic.com",), "x-api-key", False),
        Preset("openrouter", ("openrouter.ai",), "authorization", True),
        Preset("groq", ("api.groq.com",), "authorization", True),
        Preset("deepseek", ("api.deepseek.com",), "authorization", True),
        Preset("mistral", ("api.mistral.ai",), "authorization", True),
        Preset("gemini", ("generativelanguage.googleapis.com",), "x-goog-api-key", False),
        Preset("generic", (), "authorization", True),
    )
}
