"""engine.modes: one object per mode, the only place that tells ALR and DLR apart."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from codegen.ir import Program, Schedule
from engine import modes
from engine.evolution.grammar import load_grammar
from engine.evolution.seeds import snap_all

ENGINE = Path(__file__).resolve().parent.parent / "engine"


def test_a_mode_is_looked_up_by_the_name_users_type_and_files_store():
    assert modes.get("alr") is modes.ALR and modes.get("dlr") is modes.DLR
    assert modes.get(modes.DLR) is modes.DLR
    assert list(modes.MODES) == ["alr", "dlr"] and modes.DEFAULT is modes.ALR
    with pytest.raises(ValueError, match="unknown mode 'xlr'; the modes are alr, dlr"):
        modes.get("xlr")
    # A damaged file's value is no mode, and no error either: the caller decides.
    assert modes.find(["alr"]) is None and modes.find(None) is None
    assert modes.find("dlr") is modes.DLR


@pytest.mark.parametrize("mode", list(modes.MODES.values()), ids=list(modes.MODES))
def test_each_mode_parses_its_baseline_and_snaps_its_zoo_into_its_grammar(mode):
    name, text = mode.baseline()
    assert isinstance(mode.parse(text), Program if mode.compiled else Schedule)
    assert mode.size(text) >= 1
    seeds = snap_all(mode.zoo_seeds(), load_grammar(mode.grammar), mode, 17)
    assert len(seeds) == len(mode.zoo_seeds())
    assert all(mode.parse(t) for t in seeds.values())


def test_dlr_behaviour_is_the_learning_rates_of_the_protocol_and_ends_at_a_non_finite_one():
    twice = modes.DLR.behaviour(Schedule.parse("mul(2.0, lr)"), "smoke")
    assert twice == "0.02,0.04,0.08"  # smoke trains 3 epochs
    assert modes.DLR.behaviour(Schedule.parse("add(lr, lr)"), "smoke") == twice
    exploding = modes.DLR.behaviour(Schedule.parse("mul(1e+30, lr)")).split(",")
    assert exploding[-1] == "inf" and len(exploding) < 100  # the default protocol: 100 epochs


def test_no_engine_module_but_modes_compares_mode_names():
    """Everything a mode does differently lives in engine/modes/__init__.py: elsewhere a mode is looked
    up and asked, never compared with "alr" or "dlr"."""
    compare = re.compile(r'(==|!=|\bin)\s*\(?\s*"(alr|dlr)"|"(alr|dlr)"\s*(==|!=)')
    found = [f"{path.name}:{number}: {line.strip()}"
             for path in sorted(ENGINE.rglob("*.py")) if path.parent.name != "modes"
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if compare.search(line)]
    assert not found, "\n".join(found)
