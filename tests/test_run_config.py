"""engine.app.config.RunConfig: a run's settings typed and validated once, and config.json as
runs have always written it (runs made before the class existed resume and show unchanged)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from engine import modes
from engine.app import session as run_module
from engine.app.cli import UsageError
from engine.evolution.evolve import EvolutionConfig
from engine.app.config import MAX_SEED, RunConfig, build_parser, new_config, resumed_config

# config.json as engine.run wrote it before RunConfig existed (commit 346cc89, `--mode alr
# --preset smoke --seed 3 --executor serial`), the grammar text and the seeds cut short.
BEFORE = {
    "format": "autolr-run", "version": 1, "name": "rc-B", "out": "/tmp/rc-B", "mode": "alr",
    "preset": "smoke", "seed": 3,
    "evolution": {"population": 6, "generations": 3, "elitism": 1, "tournament": 2,
                  "p_cross": 0.9, "p_mut": 0.15, "min_depth": 4, "max_depth": 17, "seed": 3},
    "grammar": "/tmp/rc-base/engine/evolution/grammars/alr.bnf",
    "grammar_text": "# ALR (adaptive) grammar\n<start> ::= ...\n",
    "seeds": {"adam": "weight: sub(weight, grad)"}, "seed_zoo": True, "seed_programs": None,
    "seed_lr": 0.001, "time_limit": 120.0, "time_budget": None, "executor": "serial",
    "workers": None, "ray_address": None, "store": "/tmp/rc-B.sqlite", "backend": "auto",
    "tensorboard": None,
    "command": "python -m engine.run --mode alr --preset smoke --seed 3 --executor serial "
               "--out /tmp/rc-B --store /tmp/rc-B.sqlite",
    "reproduce": "python -m engine.run --mode alr --preset smoke --seed 3 --population 6 "
                 "--generations 3",
    "created": "2026-11-29T20:50:56+00:00",
    "versions": {"python": "3.11.7", "autolr": "0.1.0", "torch": "2.13.0+cpu",
                 "numba": "0.68.1", "numpy": "2.4.6", "triton": "3.6.0"},
}

# EvolutionConfig's options added since (engine/evolution/evolve.py), read as their defaults: off.
ADDED = {"p_mut_const": None, "remutate": 0, "niche_cap": 0, "restart_after": 0,
         "refine_constants": 0}


def test_a_config_written_before_runconfig_reads_back_key_for_key():
    config = RunConfig.from_json(copy.deepcopy(BEFORE))
    assert config.mode is modes.get("alr") and config.evolution.population == 6
    assert config.store == Path("/tmp/rc-B.sqlite") and config.tensorboard is None
    written = config.to_json()
    assert written == {**BEFORE, "evolution": {**BEFORE["evolution"], **ADDED}}
    assert list(written) == list(BEFORE)  # same keys, same order


def test_a_new_config_round_trips_through_json(tmp_path):
    args = build_parser().parse_args(["--preset", "smoke", "--seed", "3", "--out",
                                      str(tmp_path / "run"), "--store", str(tmp_path / "s.db")])
    config = new_config(args, ["--preset", "smoke"])
    data = json.loads(json.dumps(config.to_json()))
    assert list(data) == [*BEFORE, "tiers"]  # an ALR preset run names its funnel's tiers
    assert RunConfig.from_json(data) == config


def test_resume_reads_a_config_written_before_runconfig(tmp_path):
    out = tmp_path / "moved"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(BEFORE), encoding="utf-8")
    args = build_parser().parse_args(["--resume", "--out", str(out), "--generations", "5",
                                      "--executor", "local", "--workers", "2"])
    config = resumed_config(args, out)
    assert config.out == out and config.evolution.generations == 5
    assert (config.executor, config.workers) == ("local", 2)
    expected = {**BEFORE, "out": str(out), "executor": "local", "workers": 2,
                "evolution": {**BEFORE["evolution"], **ADDED, "generations": 5}}
    assert config.to_json() == expected


@pytest.mark.parametrize("damage, says", [
    (lambda d: d.pop("store"), "key 'store' is missing"),
    (lambda d: d.update(seed="3"), "key 'seed' holds '3'"),
    (lambda d: d.update(seed_zoo=1), "key 'seed_zoo' holds 1"),
    (lambda d: d.update(workers=True), "key 'workers' holds True"),
    (lambda d: d["evolution"].pop("population") and d["evolution"].update(size=6),
     "key 'evolution'"),
    (lambda d: d.update(mode="sgd"), "mode 'sgd' is not one of"),
    (lambda d: d.update(executor="ray", ray_address=None, workers=0), "workers must be"),
    (lambda d: d.update(format="other"), "is not an AutoLR run config"),
])
def test_a_damaged_config_names_its_bad_key(damage, says):
    data = copy.deepcopy(BEFORE)
    damage(data)
    with pytest.raises(ValueError, match="^config.json") as info:
        RunConfig.from_json(data)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_resume_of_a_damaged_config_is_one_line_and_exit_2(tmp_path, capsys):
    """A config.json missing a key was a KeyError traceback at resume."""
    out = tmp_path / "run"
    out.mkdir()
    data = {k: v for k, v in BEFORE.items() if k != "seeds"}
    (out / "config.json").write_text(json.dumps(data), encoding="utf-8")
    assert run_module.main(["--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "key 'seeds' is missing" in err[0] and "config.json" in err[0]


def base(**changes) -> RunConfig:
    fields = dict(name="r", out=Path("r"), mode="alr", preset="smoke", seed=0,
                  evolution=EvolutionConfig(population=4, tournament=2))
    return RunConfig(**{**fields, **changes})


@pytest.mark.parametrize("changes, says", [
    (dict(executor="local", ray_address="10.0.0.1:6379"), "--ray-address applies to"),
    (dict(executor="serial", workers=2), "--executor serial runs one candidate"),
    (dict(seed=MAX_SEED + 1), "out of range"),
    (dict(seed=-1), "out of range"),
    (dict(preset="huge"), "preset 'huge'"),
    (dict(backend="cuda"), "backend 'cuda'"),
    (dict(time_limit=0), "time_limit must be"),
])
def test_validation_is_in_one_place(changes, says):
    with pytest.raises(ValueError, match=says):
        base(**changes)


def test_a_resume_changes_only_what_it_may():
    config = base(executor="local", workers=4)
    with pytest.raises(ValueError, match="--executor serial runs one candidate"):
        config.resumed(out=Path("r"), executor="serial")
    with pytest.raises(ValueError, match="cannot change seed"):
        config.resumed(out=Path("r"), seed=1)
    later = config.resumed(out=Path("r2"), generations=9, time_budget=60.0)
    assert (later.out, later.evolution.generations, later.time_budget) == (Path("r2"), 9, 60.0)
    assert later.evolution.population == config.evolution.population


def test_the_cli_turns_a_bad_combination_into_a_usage_error(tmp_path):
    args = build_parser().parse_args(["--preset", "smoke", "--executor", "serial", "--workers",
                                      "3", "--out", str(tmp_path / "r")])
    with pytest.raises(UsageError, match="drop --workers"):
        new_config(args, [])


# -- the search options (--p-mut-const, --remutate, --niche-cap, --restart-after) ------------

SEARCH_FLAGS = ["--p-mut-const", "0.3", "--remutate", "2", "--niche-cap", "3",
                "--restart-after", "4"]


def test_search_flags_reach_the_evolution_and_config_json(tmp_path):
    argv = ["--preset", "smoke", "--out", str(tmp_path / "run"), "--store",
            str(tmp_path / "s.db"), *SEARCH_FLAGS]
    config = new_config(build_parser().parse_args(argv), argv)
    evolution = config.evolution
    assert (evolution.p_mut_const, evolution.remutate, evolution.niche_cap,
            evolution.restart_after) == (0.3, 2, 3, 4)
    data = json.loads(json.dumps(config.to_json()))
    assert {k: data["evolution"][k] for k in ADDED} == \
        {"p_mut_const": 0.3, "remutate": 2, "niche_cap": 3, "restart_after": 4,
         "refine_constants": 0}
    assert RunConfig.from_json(data) == config
    assert " ".join(SEARCH_FLAGS) in data["reproduce"]
    # Not given: the fields' defaults (off), and the reproduce line as it always was.
    plain = new_config(build_parser().parse_args(argv[:6]), argv[:6])
    assert plain.evolution == EvolutionConfig(**{**dataclasses.asdict(evolution), **ADDED})
    assert "--remutate" not in plain.reproduce


@pytest.mark.parametrize("flag, value, says", [
    ("--p-mut-const", "1.5", "not a probability in [0, 1]"),
    ("--p-mut-const", "nan", "not a probability in [0, 1]"),
    ("--p-mut-const", "x", "not a number"),
    ("--remutate", "-1", "0 (off) or a positive count"),
    ("--niche-cap", "2.5", "not an integer"),
    ("--restart-after", "-3", "0 (off) or a positive count"),
])
def test_bad_search_flags_are_one_line_and_exit_2(tmp_path, capsys, flag, value, says):
    assert run_module.main(["--preset", "smoke", "--out", str(tmp_path / "r"), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and flag in err
    assert not (tmp_path / "r").exists()


def test_a_resume_keeps_the_search_options(tmp_path):
    out = tmp_path / "run"
    argv = ["--preset", "smoke", "--out", str(out), "--store", str(tmp_path / "s.db"),
            *SEARCH_FLAGS]
    config = new_config(build_parser().parse_args(argv), argv)
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config.to_json()), encoding="utf-8")
    args = build_parser().parse_args(["--resume", "--out", str(out), "--generations", "5"])
    again = resumed_config(args, out)
    assert again.evolution == EvolutionConfig(**{**dataclasses.asdict(config.evolution),
                                                  "generations": 5})
    # The same value again is no change; another is refused like --population.
    same = build_parser().parse_args(["--resume", "--out", str(out), "--niche-cap", "3"])
    assert resumed_config(same, out).evolution.niche_cap == 3
    for flag, value in (("--niche-cap", "1"), ("--p-mut-const", "0.5"),
                        ("--restart-after", "0")):
        other = build_parser().parse_args(["--resume", "--out", str(out), flag, value])
        with pytest.raises(UsageError, match=f"--resume: {flag} {value} differs from the run's"):
            resumed_config(other, out)


def test_a_config_file_sets_the_search_options(tmp_path):
    from engine.app.flagfile import with_config_file

    toml = tmp_path / "search.toml"
    toml.write_text('remutate = 2\nniche-cap = 3\np-mut-const = 0.25\n', encoding="utf-8")
    parser = build_parser()
    args = with_config_file(parser, parser.parse_args(["--config", str(toml), "--remutate", "5"]))
    assert (args.remutate, args.niche_cap, args.p_mut_const, args.restart_after) == \
        (5, 3, 0.25, None)  # the command line wins
    argv = ["--preset", "smoke", "--out", str(tmp_path / "run"), "--store",
            str(tmp_path / "s.db"), *SEARCH_FLAGS]
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(new_config(parser.parse_args(argv), argv).to_json()))
    args = with_config_file(parser, parser.parse_args(["--config", str(saved)]))
    assert (args.p_mut_const, args.remutate, args.niche_cap, args.restart_after) == (0.3, 2, 3, 4)
    bad = tmp_path / "bad.toml"
    bad.write_text("niche-cap = -1\n", encoding="utf-8")
    with pytest.raises(UsageError, match="0 \\(off\\) or a positive count"):
        with_config_file(parser, parser.parse_args(["--config", str(bad)]))


def test_remutate_compares_children_by_behaviour(tmp_path, monkeypatch):
    """With --remutate the session hands evolve the mode's behavioural fingerprint as `same`:
    two texts of one update are the same child; without it, evolve's own canonical form."""
    seen = []
    real = run_module.evolve

    def spy(*args, **kwargs):
        seen.append(kwargs.get("same"))
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "evolve", spy)
    common = ["--preset", "smoke", "--population", "3", "--generations", "1", "--executor",
              "serial", "--no-seed-zoo", "--store", str(tmp_path / "s.db")]
    assert run_module.main([*common, "--out", str(tmp_path / "a"), "--remutate", "2"]) == 0
    assert run_module.main([*common, "--out", str(tmp_path / "b")]) == 0
    same, off = seen
    assert off is None
    assert same("weight: mul(grad, lr)") == same("weight: mul(lr, grad)") \
        != same("weight: mul(lr, sign(grad))")
    assert same("not a program") == "not a program"


@pytest.mark.parametrize("argv, names", [
    (["--preset", "smoke"], ["micro", "quick"]),
    (["--preset", "quick"], ["micro", "quick", "top"]),
    (["--preset", "quick", "--tiers", "off"], None),
    (["--preset", "smoke", "--mode", "dlr"], None),  # the micro tier trains ALR programs only
])
def test_each_alr_preset_runs_the_funnel_unless_told_not_to(tmp_path, argv, names):
    args = build_parser().parse_args([*argv, "--out", str(tmp_path / "run")])
    config = new_config(args, argv)
    assert (None if config.tiers is None else [t["name"] for t in config.tiers]) == names
    again = RunConfig.from_json(json.loads(json.dumps(config.to_json())))
    assert again.tiers == config.tiers
    if names:  # the preset's own training is the tier after the micro one
        assert config.tiers[1]["tasks"] == [config.preset]


def test_tiers_on_for_a_run_the_funnel_cannot_score_is_a_usage_error(tmp_path):
    args = build_parser().parse_args(["--mode", "dlr", "--tiers", "on", "--out",
                                      str(tmp_path / "run")])
    with pytest.raises(UsageError, match="--tiers on"):
        new_config(args, [])
