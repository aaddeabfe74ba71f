"""The generational loop: determinism, elitism, seeds, checkpoints and resume, a toy search."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter

import numpy as np
import pytest

from codegen.ir import Program, Schedule, reference_step
from engine.evolution.evolve import (CheckpointError, EvolutionConfig, Scored, _tournament, evolve,
                           load_checkpoint)
from engine.evolution.grammar import ALR_GRAMMAR, DLR_GRAMMAR, load_grammar

ALR = load_grammar(ALR_GRAMMAR)
DLR = load_grammar(DLR_GRAMMAR)
SMALL = EvolutionConfig(population=12, generations=6, elitism=2, tournament=3, p_cross=0.7,
                        p_mut=0.2, min_depth=3, max_depth=8, seed=42)


def hashed(text: str) -> float:
    """A free, deterministic, well-spread fitness: a pure function of the text."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32


def aligned(texts):
    return [hashed(t) for t in texts]


def shuffled_pairs(order_seed: int):
    """(index, fitness) pairs in a random completion order, as from a pool of workers."""
    order = random.Random(order_seed)

    def fitness(texts):
        pairs = [(i, hashed(t)) for i, t in enumerate(texts)]
        order.shuffle(pairs)
        return iter(pairs)
    return fitness


class Killed(Exception):
    pass


def killed_after(calls: int):
    """A fitness function that dies on batch number ``calls`` (0-based), like a killed run."""
    count = [0]

    def fitness(texts):
        if count[0] == calls:
            raise Killed(f"killed during batch {calls}")
        count[0] += 1
        return aligned(texts)
    return fitness


# -- determinism --------------------------------------------------------------------------------

@pytest.mark.parametrize("grammar", [ALR, DLR], ids=["alr", "dlr"])
def test_same_seed_same_history_whatever_the_arrival_order(grammar):
    reference = evolve(grammar, SMALL, aligned)
    for order_seed in (1, 2):
        other = evolve(grammar, SMALL, shuffled_pairs(order_seed))
        assert other.history == reference.history
        assert other.population == reference.population
    assert evolve(grammar, SMALL, aligned).history == reference.history
    different = evolve(grammar, EvolutionConfig(**{**SMALL.__dict__, "seed": 43}), aligned)
    assert different.history != reference.history


def test_history_records_every_individual_and_statistics():
    seen = []
    result = evolve(DLR, SMALL, aligned, on_generation=seen.append)
    assert seen == list(result.history)
    assert [r.generation for r in result.history] == list(range(SMALL.generations))
    for record in result.history:
        assert len(record.phenotypes) == len(record.fitness) == SMALL.population
        assert record.best == max(record.fitness) and record.worst == min(record.fitness)
        assert record.fitness[record.phenotypes.index(record.best_phenotype)] == record.best
        assert min(record.fitness) <= record.median <= max(record.fitness)
    assert result.best == max(((r.best_phenotype, r.best) for r in result.history),
                              key=lambda pair: pair[1])


def test_elites_keep_their_fitness_and_are_not_re_evaluated():
    asked = []
    counter = iter(range(10**6))

    def noisy(texts):  # a new value at every call: re-evaluating an elite would show
        asked.extend(texts)
        return [float(next(counter)) for _ in texts]

    result = evolve(ALR, SMALL, noisy)
    for before, after in zip(result.history, result.history[1:]):
        ranked = sorted(zip(before.fitness, before.phenotypes), key=lambda p: -p[0])
        elites = ranked[:SMALL.elitism]
        assert list(zip(after.fitness, after.phenotypes))[:SMALL.elitism] == elites
    assert len(asked) == sum(r.evaluated for r in result.history)
    batch_sizes = [r.evaluated for r in result.history[1:]]
    assert all(n <= SMALL.population - SMALL.elitism for n in batch_sizes)


def test_duplicate_texts_in_a_batch_are_evaluated_once():
    batches = []

    def fitness(texts):
        batches.append(list(texts))
        return aligned(texts)

    evolve(DLR, EvolutionConfig(population=30, generations=4, min_depth=2, max_depth=3,
                                tournament=3), fitness)
    assert all(len(b) == len(set(b)) for b in batches)


# -- seeds --------------------------------------------------------------------------------------

SEED = """alpha: mul(0.10705215, sub(alpha, grad))
beta: 0.0
sigma: 0.0
weight: mul(0.00093905505, alpha)"""


def test_seeds_enter_the_first_generation():
    config = EvolutionConfig(population=6, generations=2, max_depth=12, min_depth=3)
    result = evolve(ALR, config, aligned, seeds={"momentum": SEED.replace(", ", ",")})
    assert result.history[0].phenotypes[0] == SEED  # the grammar's own spacing


def test_bad_seeds_are_named():
    config = EvolutionConfig(population=6, generations=2, max_depth=12, min_depth=3)
    with pytest.raises(ValueError, match=r"seed 'adam' not derivable .* line 1, column 12"):
        evolve(ALR, config, aligned, seeds={"adam": SEED.replace("0.10705215", "0.1")})
    with pytest.raises(ValueError, match=r"seed 'seed 1' not derivable"):
        evolve(ALR, config, aligned, seeds=[SEED, "weight: grad"])
    with pytest.raises(ValueError, match="7 seeds do not fit in a population of 6"):
        evolve(ALR, config, aligned, seeds=[SEED] * 7)


# -- checkpoints and resume ---------------------------------------------------------------------

@pytest.mark.parametrize("kill_at", [1, 3, 5])
def test_resumed_run_ends_identical_to_an_uninterrupted_one(tmp_path, kill_at):
    whole = evolve(ALR, SMALL, aligned)
    with pytest.raises(Killed):
        evolve(ALR, SMALL, killed_after(kill_at), checkpoint_dir=tmp_path)
    seen = []
    resumed = evolve(ALR, SMALL, aligned, checkpoint_dir=tmp_path, resume=True,
                     on_generation=seen.append)
    assert resumed.history == whole.history
    assert resumed.population == whole.population
    assert [r.generation for r in seen] == list(range(kill_at, SMALL.generations))


def test_only_two_checkpoints_are_kept_and_they_are_plain_json(tmp_path):
    evolve(DLR, SMALL, aligned, checkpoint_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["gen-000004.json", "gen-000005.json"]
    body = load_checkpoint(tmp_path / "gen-000005.json")
    assert body["generation"] == 5 and len(body["history"]) == 6
    json.loads((tmp_path / "gen-000005.json").read_text(),
               parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_truncated_checkpoint_is_refused_and_the_previous_one_used(tmp_path):
    short = EvolutionConfig(**{**SMALL.__dict__, "generations": 4})
    evolve(ALR, short, aligned, checkpoint_dir=tmp_path)
    newest = tmp_path / "gen-000003.json"
    newest.write_text(newest.read_text()[:5000])
    with pytest.raises(CheckpointError, match="not a complete JSON checkpoint"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match="refusing checkpoint .*gen-000003.json"):
        resumed = evolve(ALR, SMALL, aligned, checkpoint_dir=tmp_path, resume=True)
    assert resumed.history == evolve(ALR, SMALL, aligned).history  # also extended 4 -> 6
    assert load_checkpoint(tmp_path / "gen-000004.json")["generation"] == 4


def test_corrupt_checkpoints_are_refused_with_a_message(tmp_path):
    evolve(DLR, SMALL, aligned, checkpoint_dir=tmp_path)
    for path in tmp_path.glob("gen-*.json"):
        data = json.loads(path.read_text())
        data["body"]["population"][0]["fitness"] = 99.0  # valid JSON, wrong content
        path.write_text(json.dumps(data))
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            load_checkpoint(path)
    with pytest.warns(UserWarning), \
            pytest.raises(CheckpointError, match="no usable checkpoint in .*checksum mismatch"):
        evolve(DLR, SMALL, aligned, checkpoint_dir=tmp_path, resume=True)
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not an AutoLR checkpoint"):
        load_checkpoint(tmp_path / "other.json")


def test_resume_refuses_a_different_run_and_fresh_runs_refuse_old_checkpoints(tmp_path):
    evolve(DLR, SMALL, aligned, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        evolve(DLR, SMALL, aligned, checkpoint_dir=tmp_path)
    other = EvolutionConfig(**{**SMALL.__dict__, "p_mut": 0.5})
    with pytest.raises(CheckpointError, match="written with p_mut=0.2, but this run has p_mut=0.5"):
        evolve(DLR, other, aligned, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="different grammar"):
        evolve(ALR, SMALL, aligned, checkpoint_dir=tmp_path, resume=True)
    fewer = EvolutionConfig(**{**SMALL.__dict__, "generations": 3})
    with pytest.raises(CheckpointError, match="already has 6 generations"):
        evolve(DLR, fewer, aligned, checkpoint_dir=tmp_path, resume=True)
    # resuming a finished run with the same config just returns it
    assert evolve(DLR, SMALL, aligned, checkpoint_dir=tmp_path, resume=True).history == \
        evolve(DLR, SMALL, aligned).history
    with pytest.raises(ValueError, match="resume=True needs the checkpoint_dir"):
        evolve(DLR, SMALL, aligned, resume=True)


def test_resume_in_an_empty_directory_starts_afresh(tmp_path):
    result = evolve(DLR, SMALL, aligned, checkpoint_dir=tmp_path / "new", resume=True)
    assert result.history == evolve(DLR, SMALL, aligned).history


# -- bad fitness functions and configs ------------------------------------------------------------

@pytest.mark.parametrize("fitness, message", [
    (lambda texts: [0.5] * (len(texts) - 1), r"returned \d+ values for a batch of"),
    (lambda texts: [math.nan] * len(texts), "fitness must be finite"),
    (lambda texts: [math.inf] * len(texts), "fitness must be finite"),
    (lambda texts: ["good"] * len(texts), "fitness must be a number"),
    (lambda texts: [(0, 1.0)] * len(texts), "returned index 0 twice"),
    (lambda texts: [(len(texts), 1.0)], "pairs must be"),
    (lambda texts: [(0, 1.0)], r"no value for batch indices \[1"),
])
def test_bad_fitness_results_are_refused(fitness, message):
    with pytest.raises(ValueError, match=message):
        evolve(DLR, SMALL, fitness)


def test_numpy_values_and_indices_are_accepted():
    def fitness(texts):
        return [(np.int64(i), np.float32(hashed(t))) for i, t in enumerate(texts)]

    result = evolve(DLR, SMALL, fitness)
    assert all(type(f) is float for f in result.history[-1].fitness)  # JSON-ready


@pytest.mark.parametrize("change, message", [
    ({"population": 0}, "population must be at least 1"),
    ({"generations": 0}, "generations must be at least 1"),
    ({"elitism": 12}, r"elitism must be in \[0, population\)"),
    ({"tournament": 13}, r"tournament must be in \[1, population\]"),
    ({"p_cross": 1.5}, r"p_cross must be a probability"),
    ({"p_mut": -0.1}, r"p_mut must be a probability"),
    ({"min_depth": 9}, "need 1 <= min_depth <= max_depth"),
    ({"seed": 1.5}, "seed must be an int"),
])
def test_bad_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        EvolutionConfig(**{**SMALL.__dict__, **change})


# -- the loop searches ----------------------------------------------------------------------------

def test_toy_schedule_search_improves():
    """Fit a step schedule by its values, evaluated with the IR's own interpreter."""
    target = Schedule.parse("if(epoch < 30, 0.05045455, if(epoch < 60, 0.010190909, 1e-04))")
    epochs = range(0, 100, 5)
    want = [target(e, 0.01) for e in epochs]

    def fitness(texts):
        schedules = [Schedule.parse(t) for t in texts]
        return [-sum(abs(s(e, 0.01) - w) for e, w in zip(epochs, want)) / len(want)
                for s in schedules]

    for seed in range(3):
        config = EvolutionConfig(population=40, generations=30, tournament=3, min_depth=2,
                                 max_depth=6, seed=seed)
        history = evolve(DLR, config, fitness).history
        assert history[-1].best > history[0].best
        assert history[-1].median > history[0].median


def test_toy_optimizer_search_improves():
    """Match the weights a target optimizer reaches in three steps (IR reference semantics)."""
    rng = np.random.default_rng(0)
    grads = rng.standard_normal((3, 16)).astype(np.float32)
    start = rng.standard_normal(16).astype(np.float32)

    def trajectory(program):
        weight, state = start, {}
        for grad in grads:
            weight, state = reference_step(program, weight, grad, state)
        return weight

    want = trajectory(Program.parse("weight: mul(0.10705215, grad)"))

    def fitness(texts):
        errors = [float(np.mean(np.abs(trajectory(Program.parse(t)) - want))) for t in texts]
        return [-e if math.isfinite(e) else -1e6 for e in errors]  # a floor for NaN/inf

    for seed in range(3):
        config = EvolutionConfig(population=40, generations=30, tournament=3, min_depth=3,
                                 max_depth=8, seed=seed)
        history = evolve(ALR, config, fitness).history
        assert history[-1].best > history[0].best


# -- tournament selection ----------------------------------------------------------------------

def scored(*fitness: float) -> list[Scored]:
    """A population in which only fitness and position matter (the individual is a label)."""
    return [Scored(f"member {i}", f) for i, f in enumerate(fitness)]


def test_a_tournament_of_the_whole_population_picks_the_fittest_and_the_earlier_of_a_tie():
    population = scored(0.3, 0.9, 0.1, 0.9, 0.5)
    for seed in range(200):
        assert _tournament(population, len(population), random.Random(seed)) is population[1]
    assert _tournament(scored(0.2, 0.2), 2, random.Random(0)).individual == "member 0"


def test_a_tournament_draws_distinct_entrants_and_the_best_of_them_wins():
    """Size 3 of 6: the two least fit can never win (two entrants beat them), the fittest wins
    when drawn, C(5, 2) / C(6, 3) = 1/2 of the time; size 1 is a uniform draw."""
    population = scored(0.1, 0.6, 0.2, 0.5, 0.4, 0.3)
    rng = random.Random(5)
    wins = Counter(_tournament(population, 3, rng).individual for _ in range(2000))
    assert set(wins) == {"member 1", "member 3", "member 4", "member 5"}
    assert 0.45 < wins["member 1"] / 2000 < 0.55
    wins = Counter(_tournament(population, 1, rng).individual for _ in range(2000))
    assert len(wins) == 6 and min(wins.values()) > 2000 / 6 * 0.8

