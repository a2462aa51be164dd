"""How a provider scopes its rate limits, and which scope a request falls in.

Providers limit per key (Kimi Code, Moonshot), per model (OpenAI, Gemini, Groq, Mistral,
DeepSeek) or per model class (Anthropic: Opus, Sonnet and Haiku have separate limits). A
request's scope is read from its JSON body's `model`, or from its URL where the provider puts
the model there (Gemini's `/v1beta/models/{model}:generateContent`).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from .body_json import BodyJSON, read_json
from .presets import PRESETS, LimitScope

KEY_SCOPE = ""
"""The scope of everything held key-wide (and of requests whose model is not known)."""

DEFAULT_SCOPES: dict[str, LimitScope] = {name: p.limit_scope for name, p in PRESETS.items()}
"""How each preset's provider scopes its limits, as its documentation says (`Preset`)."""

MAX_MODEL = 200
"""Longer "model names" are garbage; they are cut so a scope name stays small."""

_URL_MODEL = re.compile(r"/models/([^/:?]+):[A-Za-z]+$")
_FAMILIES = ("opus", "sonnet", "haiku")
_DATE = re.compile(r"[0-9]{8}")


__all__ = ["KEY_SCOPE", "LimitScope", "anthropic_class", "model_of_request", "scope_of"]


def default_scope(provider: str) -> LimitScope:
    """The scope a preset's provider limits by; `key` for presets that do not say."""
    return DEFAULT_SCOPES.get(provider, "key")


def model_of_request(path: str, body: bytes | None, parsed: BodyJSON | None = None) -> str | None:
    """The model a request asks for: the JSON body's `model`, else the URL's
    `/models/{model}:{method}`; None when neither names one. `parsed`: the body's parse
    (`read_json(body)`) when it was read already. Never raises."""
    model = _body_model(body, parsed)
    if model is None:
        m = _URL_MODEL.search(path.split("?", 1)[0])
        model = unquote(m.group(1)) if m else None
    if model is None:
        return None
    model = model.strip()
    if not model.isprintable():  # a character at a time only when one must go
        model = "".join(c for c in model if c.isprintable())
    return model[:MAX_MODEL] or None


def _body_model(body: bytes | None, parsed: BodyJSON | None) -> str | None:
    # Only a body that is an object as written (a byte-order mark, say, is not one here).
    if not body or body.lstrip()[:1] != b"{":
        return None
    data = (parsed if parsed is not None else read_json(body)).data
    model = data.get("model") if data is not None else None
    return model if isinstance(model, str) and model.strip() else None


def anthropic_class(model: str) -> str:
    """The rate-limit class of an Anthropic model name: family and major version
    (`claude-3-5-haiku-latest` -> `haiku-3`, `claude-sonnet-4-5-20250929` -> `sonnet-4`).

    Anthropic limits each class separately and the 4.x models of one family together. Two 3.x
    versions of a family share a class here although Anthropic limits them apart: sharing
    can only cost capacity, never send a request past a limit. A name that is not a Claude
    model of a known family is its own class.
    """
    name = model.strip().lower()
    at = name.rfind("claude-")
    if at < 0:
        return model
    parts = [p for p in re.split(r"[-.@:]", name[at + len("claude-") :]) if p]
    family = next((p for p in parts if p in _FAMILIES), None)
    if family is None:
        return model
    before = parts[: parts.index(family)]
    after = parts[parts.index(family) + 1 :]
    # Older names put the version first (claude-3-5-haiku), newer ones after (claude-sonnet-4-5).
    versions = [p for p in (before or after) if p.isdigit() and not _DATE.fullmatch(p)]
    return f"{family}-{versions[0]}" if versions else family


def scope_of(limit_scope: LimitScope | None, provider: str, model: str | None) -> str:
    """The scope a request's budgets and cooldowns are held in: KEY_SCOPE for key-wide
    limits (or an unknown model), `model:<name>` or `class:<class>` otherwise.

    `limit_scope` None means the provider's default (`default_scope`).
    """
    scope = limit_scope or default_scope(provider)
    if scope == "key" or not model:
        return KEY_SCOPE
    if scope == "model_class":
        return f"class:{anthropic_class(model)}"
    return f"model:{model}"
