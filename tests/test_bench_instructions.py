"""Tests for scripts/bench_instructions.py's reading of callgrind's output and of Python's perf
map (the benchmark itself runs mitmdump under valgrind, minutes: not part of the suite)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from bench_instructions import (
    PerfMap,
    by_function,
    estimated_cycles,
    on_timers,
    summary,
    total_instructions,
)

PERF_MAP = """\
7f0000001000 b py::Rotor.request:/x/addon/kmi_rotor/addon.py
7f0000000000 10 py::Engine.decide:/x/addon/kmi_rotor/engine.py
7f0000002000 20 py::trigger_event:/x/mitmproxy/addonmanager.py
"""


def test_the_perf_map_names_an_address_inside_a_trampoline_only() -> None:
    m = PerfMap.parse(PERF_MAP)
    assert m.name_of(0x7F0000000000) == "py::Engine.decide:/x/addon/kmi_rotor/engine.py"
    assert m.name_of(0x7F000000000F) == "py::Engine.decide:/x/addon/kmi_rotor/engine.py"
    assert m.name_of(0x7F0000000010) is None  # past its end
    assert m.name_of(0x7F000000100A) == "py::Rotor.request:/x/addon/kmi_rotor/addon.py"
    assert m.name_of(0x7F000000201F) == "py::trigger_event:/x/mitmproxy/addonmanager.py"
    assert m.name_of(0x7F0000002020) is None
    assert m.name_of(0x10) is None  # before the first


def test_inclusive_costs_by_function_skip_recursive_entries_and_unknown_addresses() -> None:
    annotated = """\
--------------------------------------------------------------------------------
Ir
--------------------------------------------------------------------------------
1,000,000 (100.0%)  PROGRAM TOTALS
  600,000 (60.00%)  ???:0x00007f0000002004 [???]
  250,000 (25.00%)  ???:0x00007f0000001000 [???]
  240,000 (24.00%)  ???:0x00007f0000001000'2 [???]
   90,000 ( 9.00%)  ???:0x00007f0000000008 [???]
   80,000 ( 8.00%)  ???:0x0000000000001234 [???]
   70,000 ( 7.00%)  Objects/dictobject.c:_Py_dict_lookup [/usr/lib/libpython3.13.so]
"""
    assert by_function(annotated, PerfMap.parse(PERF_MAP)) == {
        "py::trigger_event:/x/mitmproxy/addonmanager.py": 600_000,
        "py::Rotor.request:/x/addon/kmi_rotor/addon.py": 250_000,
        "py::Engine.decide:/x/addon/kmi_rotor/engine.py": 90_000,
    }


def test_the_total_is_the_summary_line(tmp_path: Path) -> None:
    dump = tmp_path / "callgrind.out.1"
    dump.write_text("version: 1\ncmd: mitmdump\nevents: Ir\nsummary: 1737534257\ntotals: 1\n")
    assert total_instructions(dump) == 1737534257
    dump.write_text("version: 1\n")
    with pytest.raises(ValueError, match="no summary"):
        total_instructions(dump)


def test_cycles_are_estimated_from_the_simulated_misses(tmp_path: Path) -> None:
    dump = tmp_path / "callgrind.out.1"
    events = "Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw Bc Bcm Bi Bim"
    dump.write_text(f"events: {events}\nsummary: 1000 400 200 1 2 3 4 5 6 100 7 50 8\n")
    got = summary(dump)
    assert got["Ir"] == total_instructions(dump) == 1000 and got["Bim"] == 8
    # 1000 instructions, 6 first-level misses, 15 last-level ones, 15 mispredictions
    assert estimated_cycles(got) == 1000 + 10 * 6 + 100 * 15 + 10 * 15


def test_work_on_timers_is_kmi_rotors_own_timer_roots_only() -> None:
    costs = {
        "py::StateKeeper._run:/x/addon/kmi_rotor/keeper.py": 100,
        "py::StateKeeper._commit:/x/addon/kmi_rotor/keeper.py": 50,
        "py::signature:/x/addon/kmi_rotor/reloader.py": 7,
        "py::signature:/usr/lib/python3.13/inspect.py": 1000,  # not ours
        "py::StateKeeper.sync:/x/addon/kmi_rotor/keeper.py": 90,  # inside _run: not again
        "py::Rotor.request:/x/addon/kmi_rotor/addon.py": 500,
    }
    assert on_timers(costs) == 157
