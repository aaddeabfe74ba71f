"""Constant refinement of promoted candidates (EvolutionConfig.refine_constants,
engine/evolution/refine.py): synthetic funnel-shaped fitness for the search's properties, and one
real smoke run through engine.run."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.app import session as run_module
from engine.app.cli import UsageError
from engine.app.config import build_parser, new_config, resumed_config
from engine.evolution import refine as refine_module
from engine.evolution.evolve import EvolutionConfig, evolve
from engine.evolution.grammar import ALR_EXT_GRAMMAR, load_grammar
from engine.evolution.refine import promoted, refinable, refine
from engine.evolution.sge import individual_from_text, initialise
from engine.evolution.structure import structure_key
from engine.fitness.tiers import split_fitness
from engine.rundir import checkpoint_files, load_checkpoint
from test_evolve import ALR, SMALL, hashed
from test_run import engine_run, env, events, history_rows, wait_for  # noqa: F401  (env: a fixture)

ROOT = Path(__file__).resolve().parent.parent
EXT = load_grammar(ALR_EXT_GRAMMAR)
CONFIG = EvolutionConfig(**SMALL.__dict__ | {"max_depth": 10, "generations": 6,
                                             "refine_constants": 2})
NUMBER = re.compile(r"(?<![A-Za-z_])\d+(?:\.\d*)?(?:e[-+]?\d+)?")


def tiered_one(text: str) -> float:
    """A funnel-shaped fitness, 2 * level + score: the structure decides the level (about half
    the structures are 'promoted'), the constants the score (best when their mean log10 is -1),
    so constant refinement has something to find."""
    level = 1 if hashed(structure_key(text)) < 0.5 else 0
    values = [float(v) for v in NUMBER.findall(text) if float(v) != 0.0]
    if not values:
        return 2.0 * level + 0.5
    mean = sum(math.log10(v) for v in values) / len(values)
    return 2.0 * level + 1.0 / (1.0 + abs(mean + 1.0))


def tiered(texts):
    return [tiered_one(t) for t in texts]


def population(seed: int, size: int = 12) -> list:
    rng = random.Random(seed)
    members = [initialise(EXT, rng, 3, 10) for _ in range(size)]
    return [(m, tiered_one(m.phenotype)) for m in members]


def spy_on_choices(monkeypatch) -> list[list[str]]:
    """The structures each refine() call chose (the real function runs; this only records)."""
    calls: list[list[str]] = []
    real = refine_module._chosen

    def chosen(grammar, members, count, refined):
        picked = real(grammar, members, count, refined)
        calls.append([structure_key(members[i][0].phenotype) for i in picked])
        return picked

    monkeypatch.setattr(refine_module, "_chosen", chosen)
    return calls


# -- one refinement ------------------------------------------------------------------------------

def test_a_refined_member_differs_from_its_original_only_in_constants():
    improved = 0
    for seed in range(12):
        members = population(seed)
        sent: list[str] = []
        distinct: list[int] = []

        def evaluate(texts):
            sent.extend(texts)
            distinct.append(len(set(texts)))
            return tiered(texts)

        better, count = refine(EXT, members, 3, set(), evaluate, random.Random(seed), 10)
        chosen = {structure_key(members[i][0].phenotype) for i in better}
        assert all(structure_key(t) in {structure_key(m.phenotype) for m, _ in members}
                   for t in sent)
        assert count == sum(distinct) and len(distinct) <= refine_module.STEPS
        for index, (child, value) in better.items():
            parent, before = members[index]
            assert promoted(before) and value > before
            assert structure_key(child.phenotype) == structure_key(parent.phenotype)
            assert child.phenotype != parent.phenotype
            for nt, (old, new) in enumerate(zip(parent.genotype, child.genotype)):
                if not EXT.free[nt]:
                    assert old == new  # structure codons untouched
            assert structure_key(child.phenotype) in chosen
            improved += 1
    assert improved > 0  # the search found better constants somewhere


def test_promoted_reads_the_funnels_level():
    for fitness in (0.0, 0.7, 1.0, 1.999, 2.0, 2.5, 4.0, 5.3):
        assert promoted(fitness) == (split_fitness(fitness)[0] >= 1)


def test_refinement_never_makes_the_best_worse_and_picks_only_promoted_members():
    for seed in range(12):
        members = population(seed)
        before = max(v for _, v in members)
        better, _ = refine(EXT, members, 4, set(), tiered, random.Random(seed), 10)
        after = [better.get(i, m) for i, m in enumerate(members)]
        assert max(v for _, v in after) >= before
        for i, (child, value) in better.items():
            assert value > members[i][1] and promoted(members[i][1])
    # Constants already at their best: every variant scores lower, and nothing is replaced.
    members = [(m, 2.9) for m, _ in population(5)]
    at_best = {m.phenotype for m, _ in members}
    refined: set[str] = set()

    def worse(texts):
        return [2.9 if t in at_best else tiered_one(t) - 0.1 for t in texts]

    assert refine(EXT, members, 4, refined, worse, random.Random(0), 10)[0] == {}
    assert len(refined) == 4


def test_only_promoted_members_with_free_constants_are_chosen():
    members = population(3)
    refined: set[str] = set()
    refine(EXT, members, len(members), refined, tiered, random.Random(0), 10)
    expected = {structure_key(m.phenotype) for m, v in members
                if promoted(v) and refinable(EXT, m)}
    assert refined == expected and refined
    # Unpromoted (a fitness without tiers): nothing is chosen, nothing is sent.
    flat = [(m, 0.9) for m, _ in members]
    assert refine(EXT, flat, 3, set(), tiered, random.Random(0), 10) == ({}, 0)


def test_a_variant_that_changes_structure_is_never_sent():
    """mul(1.0, grad) is grad to the canonical tree: moving that 1.0 makes a new structure, so
    every variant here is dropped unscored, and the structure still counts as refined."""
    text = "alpha: grad\nbeta: grad\nsigma: grad\nweight: mul(0.001, mul(1.0, grad))"
    member = individual_from_text(EXT, text, 10)
    sent: list[str] = []
    refined: set[str] = set()
    result = refine(EXT, [(member, 2.5)], 1, refined,
                    lambda texts: sent.extend(texts) or tiered(texts), random.Random(0), 10)
    assert result == ({}, 0) and sent == []
    assert refined == {structure_key(text)}


# -- in a run ------------------------------------------------------------------------------------

def test_a_structure_is_refined_at_most_once_per_run(monkeypatch):
    calls = spy_on_choices(monkeypatch)
    evolve(EXT, CONFIG, tiered)
    chosen = [key for call in calls for key in call]
    assert len(calls) == CONFIG.generations and chosen
    assert len(chosen) == len(set(chosen))


def test_refinement_in_a_run_is_counted_and_replaces_originals():
    plain = evolve(EXT, EvolutionConfig(**CONFIG.__dict__ | {"refine_constants": 0}), tiered)
    seen: list[int] = []

    def counting(texts):
        seen.append(len(set(texts)))
        return tiered(texts)

    on = evolve(EXT, CONFIG, counting)
    assert sum(r.evaluated for r in on.history) == sum(seen)
    assert sum(r.evaluated for r in on.history) > sum(r.evaluated for r in plain.history)
    # Generation 0 is bred alike (refinement draws from its own stream); refined members take
    # their originals' places, same structure, better fitness.
    zero, base = on.history[0], plain.history[0]
    replaced = [i for i, (a, b) in enumerate(zip(zero.phenotypes, base.phenotypes)) if a != b]
    assert replaced
    for i in replaced:
        assert structure_key(zero.phenotypes[i]) == structure_key(base.phenotypes[i])
        assert zero.fitness[i] > base.fitness[i]
    assert zero.best >= base.best


def test_off_by_default_and_the_same_seed_gives_the_same_run():
    assert EvolutionConfig().refine_constants == 0
    first, second = evolve(EXT, CONFIG, tiered), evolve(EXT, CONFIG, tiered)
    assert first.history == second.history and first.population == second.population


# A generation is 4 fitness calls (the children, then 3 refinement steps): kills during
# generation 0's refinement, generation 1's last step, generation 2's first, generation 4's
# children.
@pytest.mark.parametrize("kill_at", [2, 7, 10, 17])
def test_a_resume_mid_run_gives_the_uninterrupted_result(tmp_path, kill_at):
    whole = evolve(EXT, CONFIG, tiered)
    calls = [0]

    def dies(texts):
        calls[0] += 1
        if calls[0] == kill_at:
            raise RuntimeError("killed")
        return tiered(texts)

    with pytest.raises(RuntimeError):
        evolve(EXT, CONFIG, dies, checkpoint_dir=tmp_path)
    if kill_at > 4:  # the structures refined so far are part of the checkpoint
        assert load_checkpoint(checkpoint_files(tmp_path)[0])["refined"]
    resumed = evolve(EXT, CONFIG, tiered, checkpoint_dir=tmp_path, resume=True)
    assert resumed.history == whole.history
    assert resumed.population == whole.population


def test_grammars_without_free_constants_refuse_the_option():
    with pytest.raises(ValueError, match="refine_constants needs a grammar with free constants"):
        evolve(ALR, EvolutionConfig(**SMALL.__dict__ | {"refine_constants": 1}), tiered)
    with pytest.raises(ValueError, match="refine_constants must be 0"):
        EvolutionConfig(refine_constants=-1)


@pytest.mark.parametrize("extra, says", [
    ([], "--refine-constants: "),  # the paper grammar: constants from a table
    (["--grammar", str(ALR_EXT_GRAMMAR), "--tiers", "off"], "has no funnel"),
])
def test_the_cli_refuses_the_option_where_nothing_can_be_refined(tmp_path, capsys, extra, says):
    out = tmp_path / "r"
    code = run_module.main(["--preset", "smoke", "--out", str(out), "--store",
                            str(tmp_path / "s.db"), "--refine-constants", "1", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and says in err
    assert not out.exists()


def test_config_json_keeps_the_option_and_a_resume_cannot_change_it(tmp_path):
    out = tmp_path / "run"
    argv = ["--preset", "smoke", "--out", str(out), "--store", str(tmp_path / "s.db"),
            "--grammar", str(ALR_EXT_GRAMMAR), "--refine-constants", "2"]
    config = new_config(build_parser().parse_args(argv), argv)
    assert config.evolution.refine_constants == 2
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config.to_json()), encoding="utf-8")
    kept = resumed_config(build_parser().parse_args(["--resume", "--out", str(out)]), out)
    assert kept.evolution.refine_constants == 2
    changed = build_parser().parse_args(["--resume", "--out", str(out), "--refine-constants", "1"])
    with pytest.raises(UsageError, match="--refine-constants 1 differs from the run's"):
        resumed_config(changed, out)


# -- a real run ------------------------------------------------------------------------------------

def smoke_args(run_dir: Path, store: Path) -> list:
    return ["--mode", "alr", "--preset", "smoke", "--executor", "serial", "--out", run_dir,
            "--store", store, "--grammar", ALR_EXT_GRAMMAR, "--refine-constants", "1"]


@pytest.fixture(scope="module")
def refined_run(tmp_path_factory, env):  # noqa: F811
    """An uninterrupted smoke run with the extended grammar and --refine-constants 1."""
    base = tmp_path_factory.mktemp("refine")
    result = engine_run(smoke_args(base / "run", base / "store.sqlite"), env, cwd=base)
    return base / "run", result


GEN_LINE = re.compile(r"^gen +\d+/\d+ .* new +(\d+) \(([^)]*)\)", re.MULTILINE)


@pytest.mark.slow
def test_a_smoke_run_with_the_extended_grammar_refines_constants(refined_run):
    run_dir, result = refined_run
    config = json.loads((run_dir / "config.json").read_text())
    assert config["evolution"]["refine_constants"] == 1
    assert "--refine-constants 1" in config["reproduce"]
    body = load_checkpoint(checkpoint_files(run_dir / "checkpoints")[0])
    assert body["refined"]
    assert all(r["evaluated"] > config["evolution"]["population"] for r in body["history"])
    # The display counts a generation's every answer, refinement's batches included.
    lines = GEN_LINE.findall(result.stdout)
    assert len(lines) == config["evolution"]["generations"]
    for new, detail in lines:
        assert sum(int(n) for n in re.findall(r"(\d+)", detail)) == int(new), (new, detail)


@pytest.mark.slow
def test_a_smoke_run_killed_while_refining_resumes_to_the_uninterrupted_run(
        refined_run, env, tmp_path):  # noqa: F811
    reference, _ = refined_run
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "engine.run",
               *map(str, smoke_args(run_dir, tmp_path / "store.sqlite"))]

    def refining_generation_1():  # past its 5 children: a refinement batch is being scored
        return sum(e.get("event") == "evaluation" and e["generation"] == 1
                   for e in events(run_dir)) > 6

    with subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) as process:
        refining = wait_for(refining_generation_1, process)
        process.kill()  # SIGKILL: nothing of the run gets to clean up
    assert refining, "the run never refined in generation 1"
    assert not any(e.get("event") == "generation" and e["generation"] == 1
                   for e in events(run_dir)), "generation 1 finished before the kill"
    engine_run(["--resume", "--out", run_dir], env, cwd=tmp_path)
    assert history_rows(run_dir) == history_rows(reference)
