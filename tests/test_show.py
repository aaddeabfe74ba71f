"""`python -m engine.show` on whole and damaged run directories, and the run's live display.

The run directory is real but trained nothing: evolve writes its checkpoints with a fitness
made from each program's text, and engine.app.report writes summary.json and the hall of fame.
Each test damages a copy of it the way a full disk or a cut copy would.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from engine.app import config as run_config
from engine.app.config import RunConfig
from engine.evolution.evolve import EvolutionConfig, evolve
from engine.evolution.grammar import ALR_GRAMMAR, load_grammar
from engine.app.report import RunOutputs, write_all
from engine.app.show import Display, main


def fitness(texts):
    return [int(hashlib.sha256(t.encode()).hexdigest()[:6], 16) / 2**24 for t in texts]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished smoke ALR run's directory: config, checkpoints, events and every summary."""
    out = tmp_path_factory.mktemp("show") / "run"
    args = run_config.build_parser().parse_args(["--preset", "smoke", "--out", str(out),
                                                 "--store", str(out.parent / "s.sqlite")])
    config = run_config.new_config(args, [])
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config.to_json()), encoding="utf-8")
    result = evolve(load_grammar(ALR_GRAMMAR), config.evolution, fitness,
                    seeds=config.seeds, checkpoint_dir=out / "checkpoints")
    events = [{"event": "session", "time": 1000.0}]
    for record in result.history:
        events += [{"event": "evaluation", "generation": record.generation, "text": text,
                    "hash": None, "fitness": f, "source": "trained", "reason": None,
                    "seconds": 1.0, "time": 1000.0 + record.generation}
                   for text, f in zip(record.phenotypes, record.fitness)]
        events.append({"event": "generation", "generation": record.generation, "seconds": 1.0,
                       "time": 1001.0 + record.generation})
    (out / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    summary = write_all(RunOutputs(run_dir=out, config=config, history=list(result.history),
                                events=events, status="finished"))
    return out, summary


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run to damage."""
    source, summary = finished
    return shutil.copytree(source, tmp_path / "run"), summary


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def show(run_dir, capsys):
    code = main([str(run_dir)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err.splitlines()


def test_a_whole_run_shows_without_warnings(run, capsys):
    run_dir, summary = run
    code, out, err = show(run_dir, capsys)
    assert code == 0 and err == []
    assert "finished" in out and "hall of fame" in out and summary["best"]["hash"][:10] in out


@pytest.mark.parametrize("name", ["summary.json", "hall_of_fame.json"])
def test_a_truncated_summary_or_hall_of_fame_is_a_warning_and_the_rest_shows(run, capsys,
                                                                              name):
    """Both were a JSONDecodeError traceback."""
    run_dir, summary = run
    truncate(run_dir / name)
    code, out, err = show(run_dir, capsys)
    assert code == 0 and len(err) == 1, err
    assert err[0].startswith(f"engine.show: warning: {run_dir / name} is damaged (")
    assert f"--resume --out {run_dir}" in err[0]  # what rewrites it
    # Still shown: the hall of fame (recomputed from the checkpoint) and its best program.
    assert "hall of fame" in out and summary["best"]["hash"][:10] in out
    if name == "summary.json":
        assert "generations" in out and "3 of 3 generations checkpointed" in out


def test_a_summary_of_the_wrong_shape_is_a_warning_too(run, capsys):
    run_dir, summary = run
    (run_dir / "summary.json").write_text(json.dumps({"generations_done": 3}))
    code, out, err = show(run_dir, capsys)
    assert code == 0 and len(err) == 1 and "summary.json is damaged (KeyError" in err[0], err
    assert summary["best"]["hash"][:10] in out


def test_garbled_events_are_skipped_with_a_warning(run, capsys):
    run_dir, _ = run
    (run_dir / "summary.json").unlink()  # a run still going: the events are read
    lines = (run_dir / "events.jsonl").read_bytes().splitlines(keepends=True)
    garbage = [b"\xff\xfe\x00garbage\n", b"[1, 2]\n", b'{"event": "evaluation", "time": 1}\n']
    (run_dir / "events.jsonl").write_bytes(b"".join(lines[:3] + garbage + lines[3:]))
    code, out, err = show(run_dir, capsys)
    assert code == 0 and len(err) == 1, err
    assert f"{run_dir / 'events.jsonl'} is damaged (3 of {len(lines) + 3} lines are not events, " \
           "the first line 4)" in err[0]
    assert "3 of 3 generations checkpointed" in out and "hall of fame" in out


def test_a_last_line_cut_by_a_kill_is_no_damage(run, capsys):
    run_dir, _ = run
    (run_dir / "summary.json").unlink()
    with open(run_dir / "events.jsonl", "a") as handle:
        handle.write('{"event": "evaluation", "gener')
    code, out, err = show(run_dir, capsys)
    assert code == 0 and err == [] and "generations checkpointed" in out


def test_a_truncated_config_still_shows_the_summary(run, capsys):
    run_dir, summary = run
    truncate(run_dir / "config.json")
    code, out, err = show(run_dir, capsys)
    assert code == 0 and len(err) == 1, err
    assert f"{run_dir / 'config.json'} is damaged" in err[0] and "restore it" in err[0]
    assert "finished" in out and summary["best"]["hash"][:10] in out


def test_nothing_left_to_show_is_one_line_and_exit_2(run, capsys):
    run_dir, _ = run
    truncate(run_dir / "config.json")
    truncate(run_dir / "summary.json")
    code, out, err = show(run_dir, capsys)
    assert code == 2 and out == "" and len(err) == 1, err
    assert err[0].startswith("engine.show: error: nothing to show") and "config.json" in err[0]


# -- the live display: paths are text, not markup ------------------------------------------------

def display_config(out):
    return RunConfig(name=out.split("/")[-1], out=Path(out), mode="alr", preset="smoke", seed=0,
                     executor="serial", evolution=EvolutionConfig(population=6, generations=3))


def test_brackets_in_a_run_path_are_shown_as_written_on_a_terminal():
    """rich read `[/]` in a path as a closing tag: MarkupError before the run started."""
    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    with Display(display_config("runs/a[/]b[bold]"), [], [], None, workers=1,
                 console=console) as display:
        display.message("Continue with:\n  python -m engine.run --resume --out 'x[/red]'")
    text = console.file.getvalue()
    assert "writing to runs/a[/]b[bold]" in text and "--out 'x[/red]'" in text


def test_brackets_in_a_run_path_are_kept_in_a_log():
    """The plain (log) output stripped anything that looked like [bold] from the path."""
    console = Console(file=io.StringIO())
    Display(display_config("runs/a[bold]b"), [], [], None, workers=1, console=console)
    assert "writing to runs/a[bold]b" in console.file.getvalue()
