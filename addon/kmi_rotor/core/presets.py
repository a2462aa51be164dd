"""Provider presets: where each provider expects its key, and which hosts it serves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LimitScope = Literal["key", "model", "model_class"]
"""How a provider scopes its rate limits: per key, per model, or per model class."""


@dataclass(frozen=True)
class Preset:
    name: str
    hosts: tuple[str, ...]
    header: str
    """Header the key goes into when the client sent no credential of its own."""
    bearer: bool
    """Whether the header carries `Bearer <key>` rather than the bare key."""
    limit_scope: LimitScope = "key"
    """How the provider scopes its rate limits, as its documentation says (a pool may say
    otherwise with `limit_scope`)."""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("kimi-code", ("api.kimi.com",), "authorization", True),
        Preset("moonshot", ("api.moonshot.ai", "api.moonshot.cn"), "authorization", True),
        Preset("openai", ("api.openai.com",), "authorization", True, "model"),
        Preset("anthropic", ("api.anthropic.com",), "x-api-key", False, "model_class"),
        Preset("openrouter", ("openrouter.ai",), "authorization", True),
        Preset("groq", ("api.groq.com",), "authorization", True, "model"),
        Preset("deepseek", ("api.deepseek.com",), "authorization", True, "model"),
        Preset("mistral", ("api.mistral.ai",), "authorization", True, "model"),
        Preset("gemini", ("generativelanguage.googleapis.com",), "x-goog-api-key", False, "model"),
        Preset("generic", (), "authorization", True),
    )
}
