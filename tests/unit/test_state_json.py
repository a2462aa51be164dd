"""The state document's text: rendered again only where it changed, the same bytes as pydantic's."""

from __future__ import annotations

import pytest
from testkit import delta, kd, with_pools

from kmi_rotor.core import state_json
from kmi_rotor.core.health import KeyHealth, ScopedHealth, WindowState
from kmi_rotor.core.state import Delta, KeyRecord, Operator, StateDoc, merge
from kmi_rotor.core.state_json import DocRenderer

WINDOWS = {
    "requests": WindowState(limit=500, remaining=499, reset_at=1000.12, seen_at=1000.0),
    "tokens:minute": WindowState(limit=3e4, remaining=2.5e-05, seen_at=1e16),
}
HEALTH = KeyHealth(
    cooling_until=1060.0,
    cooling_reason='rate limited "hard"\n',
    error_score=1.5,
    windows=WINDOWS,
    scopes={"model:gpt-4o": ScopedHealth(windows=WINDOWS, seen_at=999.5)},
    updated_at=1000.0,
)
LIMITER = {"format": 1, "at": 999.0, "scopes": {"global": {"rpm": [[998.5, 1], [999.0, 2]]}}}


def _doc(**records: KeyRecord) -> StateDoc:
    return StateDoc(updated_at=1000.0, keys=records, limiter=LIMITER, limiter_at=999.0)


def _expected(doc: StateDoc) -> bytes:
    return doc.model_dump_json(indent=1).encode("utf-8")


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param(StateDoc(), id="empty"),
        pytest.param(StateDoc(limiter={"a": [], "b": {}, "c": [[1.0, 2]]}), id="limiter-only"),
        pytest.param(_doc(fp1=KeyRecord(label="a", fingerprint="fp1")), id="one-key"),
        pytest.param(
            _doc(
                **{
                    'fp-ü"\\\x01': KeyRecord(
                        label="ключ\u2028\t",
                        pool="池",
                        fingerprint="fp-ü",
                        requests=3,
                        last_error='ошибка: "x"\r\n',
                        last_used=1e-07,
                        health=HEALTH,
                        operator=Operator(action="block", at=5.0, until=7.0, applied=True),
                    ),
                    "fp2": KeyRecord(label="b", fingerprint="fp2", health=HEALTH),
                }
            ),
            id="escapes-health-operator",
        ),
    ],
)
def test_the_text_is_pydantics_byte_for_byte(doc: StateDoc) -> None:
    assert DocRenderer().render(doc) == _expected(doc)


def test_later_documents_reuse_unchanged_records_and_stay_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rendered: list[str] = []
    real = state_json._entry

    def entry(fp: str, rec: KeyRecord) -> bytes:
        rendered.append(fp)
        return real(fp, rec)

    monkeypatch.setattr(state_json, "_entry", entry)
    renderer = DocRenderer()
    doc = merge(StateDoc(), delta({f"fp{i}": kd(f"k{i}", "p", requests=1) for i in range(5)}), 1.0)
    assert renderer.render(doc) == _expected(doc)
    assert sorted(rendered) == [f"fp{i}" for i in range(5)]

    rendered.clear()
    changed = with_pools(delta(fp2=kd("k2", "p", requests=1, health=HEALTH)), p={"rotations": 1})
    changed.limiter, changed.limiter_at = LIMITER, 2.0
    doc = merge(doc, changed, 2.0)
    assert renderer.render(doc) == _expected(doc)
    assert rendered == ["fp2"]

    rendered.clear()
    fewer = doc.model_copy(update={"keys": {fp: doc.keys[fp] for fp in ("fp4", "fp0")}})
    assert renderer.render(fewer) == _expected(fewer)
    assert rendered == []
    assert renderer.render(merge(fewer, Delta(), 3.0)) == _expected(merge(fewer, Delta(), 3.0))


def test_a_record_seen_before_under_another_document_is_still_exact() -> None:
    renderer = DocRenderer()
    rec = KeyRecord(label="a", fingerprint="fp", requests=1)
    renderer.render(_doc(fp=rec))
    other = _doc(fp=rec.model_copy(update={"requests": 2}))
    assert renderer.render(other) == _expected(other)
    assert renderer.render(StateDoc()) == _expected(StateDoc())
    assert renderer.render(_doc(fp=rec)) == _expected(_doc(fp=rec))


def test_an_outline_not_as_expected_gives_the_plain_rendering(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(state_json, "_KEYS_LINE", b'\n "no such field": {},\n')
    doc = _doc(fp=KeyRecord(label="a", fingerprint="fp", health=HEALTH))
    assert DocRenderer().render(doc) == _expected(doc)
