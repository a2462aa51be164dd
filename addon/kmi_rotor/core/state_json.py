"""The state document as the file holds it, rendered again only where it changed.

A write changes a few keys of a document that may hold a thousand; rendering all of them each
time costs more than the rest of the write together. Key records are never changed in place (a
merge makes new ones), so a record that is the very object rendered last time has the same text.
The output is byte for byte `StateDoc.model_dump_json(indent=1)`.
"""

from __future__ import annotations

from pydantic_core import to_json

from .state import KeyRecord, StateDoc

INDENT = 1
_KEYS_LINE = b'\n "keys": {},\n'  # the only line at this depth that names the keys
_KEYS_OPEN = b'\n "keys": {\n'
_BETWEEN = b",\n"
_KEYS_CLOSE = b"\n },\n"


class DocRenderer:
    """Renders state documents, reusing the text of key records it rendered the last time."""

    def __init__(self) -> None:
        self._texts: dict[str, tuple[KeyRecord, bytes]] = {}

    def render(self, doc: StateDoc) -> bytes:
        """`doc.model_dump_json(indent=1)`, UTF-8 encoded."""
        outline = doc.model_copy(update={"keys": {}}).model_dump_json(indent=INDENT).encode()
        if not doc.keys:
            self._texts = {}
            return outline
        head, sep, tail = outline.partition(_KEYS_LINE)
        if not sep:  # not the outline expected: the whole document, the plain way
            self._texts = {}
            return doc.model_dump_json(indent=INDENT).encode()
        # The file's parts in order, joined once: a document of a thousand keys is more than a
        # megabyte, and every copy of it costs more than the loop.
        texts: dict[str, tuple[KeyRecord, bytes]] = {}
        old = self._texts
        parts = [head, _KEYS_OPEN]
        for fp, rec in doc.keys.items():
            seen = old.get(fp)
            if seen is None or seen[0] is not rec:
                seen = (rec, _entry(fp, rec))
            texts[fp] = seen
            parts.append(seen[1])
            parts.append(_BETWEEN)
        parts[-1] = _KEYS_CLOSE
        parts.append(tail)
        self._texts = texts
        return b"".join(parts)


def _entry(fp: str, rec: KeyRecord) -> bytes:
    """One member of the keys object, indented as at its depth (two levels). JSON strings hold
    no raw line break, so every line break in the record's text starts one of its lines."""
    text = rec.model_dump_json(indent=INDENT).encode().replace(b"\n", b"\n  ")
    return b"  " + to_json(fp) + b": " + text
