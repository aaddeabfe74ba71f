"""The live display of `engine.run`, driven as the run drives it, on a terminal and in a log.

No training and no clock: the display is given answers and generation records directly, and
what it shows (status lines, the ETA, the counts) is read from what it printed or rendered.
The end-to-end agreement of the display with summary.json, report.md and engine.show is in
test_run.py.
"""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from engine.fitness.evaluator import Evaluation
from engine.evolution.evolve import EvolutionConfig, GenerationRecord
from engine.app.config import RunConfig
from engine.app.show import Display

CONFIG = RunConfig(name="t", out=Path("runs/t"), mode="alr", preset="smoke", seed=0,
                   executor="local", evolution=EvolutionConfig(population=2, generations=3,
                                                               tournament=2))


def display(terminal: bool) -> tuple[Display, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=200, color_system=None)
    return Display(CONFIG, [], [], None, workers=2, console=console), out


def rendered(d: Display) -> str:
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(d.progress.get_renderable())
    return out.getvalue()


def generation(d: Display, g: int, seconds: float) -> None:
    d.start_generation(g, 2)
    d.answered(Evaluation("weight: mul(0.1, grad)", "a" * 20, 0.5, "trained"))
    d.answered(Evaluation("weight: grad", "b" * 20, 0.0, "trained", "diverged: loss nan"))
    d.generation_done(GenerationRecord(g, ("weight: mul(0.1, grad)", "weight: grad"),
                                       (0.5, 0.0), 0.5, 0.25, 0.0, "weight: mul(0.1, grad)", 2),
                      seconds)


def test_start_up_is_described_and_there_is_no_eta_before_a_generation_finished():
    d, _ = display(terminal=True)
    d.start_generation(0, 2)
    assert d.statuses == ["generation 0: screening candidates, then the first trainings on 2 "
                          "local workers (worker start-up, data loading, kernel compiles)"]
    shown = rendered(d)
    assert "worker start-up" in shown and "eta" not in shown
    d.answered(Evaluation("weight: mul(0.1, grad)", "a" * 20, 0.5, "trained"))
    assert d.statuses[-1] == "generation 0: training (start-up done)"
    assert "eta" not in rendered(d)  # one answer says nothing about a generation's length
    d.answered(Evaluation("weight: grad", "b" * 20, 0.0, "store", "diverged: loss nan"))
    d.generation_done(GenerationRecord(0, ("weight: mul(0.1, grad)", "weight: grad"), (0.5, 0.0),
                                       0.5, 0.25, 0.0, "weight: mul(0.1, grad)", 2), 40.0)
    assert "eta 1:20" in rendered(d)  # two generations left at 40 s each
    generation(d, 1, 20.0)
    assert "eta 0:30" in rendered(d)  # one left at the mean, 30 s


def test_outside_a_terminal_the_display_is_plain_lines_in_the_outcome_words():
    d, out = display(terminal=False)
    with d:
        generation(d, 0, 3.0)
        generation(d, 1, 3.0)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("AutoLR ALR run t (preset smoke")
    assert lines[2] == ("... generation 0: screening candidates, then the first trainings on 2 "
                        "local workers (worker start-up, data loading, kernel compiles)")
    assert lines[3] == "... generation 0: training (start-up done)"
    assert lines[4].startswith("gen   0/2  best 0.5000") and "(trained 1 · diverged 1)" in lines[4]
    # After start-up a log gets only the generation lines: no status lines, no escape codes.
    assert lines[5].startswith("gen   1/2") and len(lines) == 6
    assert "\x1b" not in out.getvalue()
