"""A minimal DOM tree from HTML text (standard library only), for asserting on rendered pages."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser

VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
)


@dataclass
class Node:
    """An element: tag, attributes, and children (elements or text)."""

    tag: str
    attrs: dict[str, str] = field(default_factory=dict)
    children: list[Node | str] = field(default_factory=list)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def text(self) -> str:
        """The concatenated text of the subtree, like the DOM's ``textContent``."""
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self) -> Iterator[Node]:
        """This element and every element below it, in document order."""
        yield self
        for c in self.children:
            if isinstance(c, Node):
                yield from c.iter()

    def find_all(
        self, tag: str | None = None, cls: str | None = None, attrs: dict[str, str] | None = None
    ) -> list[Node]:
        """Descendants (and self) matching every given criterion."""
        return [
            n
            for n in self.iter()
            if (tag is None or n.tag == tag)
            and (cls is None or cls in n.classes)
            and all(n.attrs.get(k) == v for k, v in (attrs or {}).items())
        ]

    def find(
        self, tag: str | None = None, cls: str | None = None, attrs: dict[str, str] | None = None
    ) -> Node:
        """The single match; fails the test when there is none or more than one."""
        found = self.find_all(tag, cls, attrs)
        assert len(found) == 1, f"expected one {tag or ''}.{cls or ''}{attrs or ''}: {len(found)}"
        return found[0]

    def style(self) -> dict[str, str]:
        """The inline ``style`` attribute as a property -> value mapping."""
        pairs = (p.split(":", 1) for p in self.attrs.get("style", "").split(";") if ":" in p)
        return {k.strip(): v.strip() for k, v in pairs}


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document")
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Node:
    """Parse serialized HTML (such as Chromium's ``--dump-dom``) into a tree."""
    builder = _Builder()
    builder.feed(html)
    builder.close()
    return builder.root
