"""The GE engine's own cost, with a fitness function that costs nothing.

Why it matters: a real evaluation trains a network for seconds, so the engine only has to stay
well below that; the number to watch is generations per second at population 100 (the CLI's
ALR default scale), and how the engine's per-individual work compares with the IR parse that every
evaluation must do anyway (the peer, measured in the same run, in ``extra_info``).

    .venv/bin/python -m pytest bench/bench_engine.py --benchmark-only
"""

from __future__ import annotations

import hashlib
import random
import time

import pytest

from codegen import ir
from engine.evolution.evolve import EvolutionConfig, evolve
from engine.evolution.grammar import ALR_GRAMMAR, DLR_GRAMMAR, load_grammar
from engine.evolution.sge import individual_from_text, initialise, map_genotype

GRAMMARS = {"alr": (load_grammar(ALR_GRAMMAR), 6, 17), "dlr": (load_grammar(DLR_GRAMMAR), 3, 10)}
POPULATION = 100
GENERATIONS = 10


def free_fitness(texts):
    """Deterministic and well spread, so selection behaves as in a real run, at ~1 us a text."""
    return [int(hashlib.blake2b(t.encode(), digest_size=4).hexdigest(), 16) for t in texts]


def ir_parser(mode: str):
    return ir.Program.parse if mode == "alr" else ir.Schedule.parse


def best_of(fn, repeat: int = 5) -> float:
    """Best wall time of a few calls: the peer figure stored next to pytest-benchmark's mean."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.mark.parametrize("mode", ["alr", "dlr"])
def test_generations_per_second(benchmark, mode):
    grammar, lo, hi = GRAMMARS[mode]
    config = EvolutionConfig(population=POPULATION, generations=GENERATIONS, elitism=1,
                             tournament=5, p_cross=0.9, p_mut=0.15, min_depth=lo, max_depth=hi)
    benchmark.group = "engine: one run of 10 generations, population 100"
    result = benchmark.pedantic(evolve, args=(grammar, config, free_fitness), rounds=5,
                                iterations=1, warmup_rounds=0)
    assert len(result.history) == GENERATIONS
    parse = ir_parser(mode)
    texts = list(result.history[-1].phenotypes)
    parse_seconds = best_of(lambda: [parse(t) for t in texts])
    if benchmark.stats is not None:  # None under --benchmark-disable
        per_generation = benchmark.stats.stats.min / GENERATIONS
        benchmark.extra_info["generations_per_second"] = round(1 / per_generation, 1)
        benchmark.extra_info["ir_parse_seconds_per_generation"] = round(parse_seconds, 5)
        benchmark.extra_info["engine_over_ir_parse"] = round(per_generation / parse_seconds, 2)


@pytest.mark.parametrize("mode", ["alr", "dlr"])
def test_map_100_genotypes(benchmark, mode):
    grammar, lo, hi = GRAMMARS[mode]
    rng = random.Random(0)
    genotypes = [initialise(grammar, rng, lo, hi).genotype for _ in range(POPULATION)]
    benchmark.group = f"{mode}: 100 individuals"
    out = benchmark(lambda: [map_genotype(grammar, g, hi) for g in genotypes])
    parse = ir_parser(mode)
    texts = [ind.phenotype for ind in out]
    parse_seconds = best_of(lambda: [parse(t) for t in texts])
    if benchmark.stats is not None:
        benchmark.extra_info["ir_parse_seconds"] = round(parse_seconds, 5)
        benchmark.extra_info["map_over_ir_parse"] = round(benchmark.stats.stats.min
                                                          / parse_seconds, 2)


@pytest.mark.parametrize("mode", ["alr", "dlr"])
def test_ir_parse_100_phenotypes(benchmark, mode):
    """The peer of test_map_100_genotypes, in the same table group."""
    grammar, lo, hi = GRAMMARS[mode]
    rng = random.Random(0)
    texts = [initialise(grammar, rng, lo, hi).phenotype for _ in range(POPULATION)]
    parse = ir_parser(mode)
    benchmark.group = f"{mode}: 100 individuals"
    benchmark(lambda: [parse(t) for t in texts])


@pytest.mark.parametrize("mode", ["alr", "dlr"])
def test_seed_from_text_100(benchmark, mode):
    """Text -> genotype (the seeding parser): slower than mapping, paid once per seed."""
    grammar, lo, hi = GRAMMARS[mode]
    rng = random.Random(0)
    texts = [initialise(grammar, rng, lo, hi).phenotype for _ in range(POPULATION)]
    benchmark.group = f"{mode}: 100 individuals"
    benchmark.pedantic(lambda: [individual_from_text(grammar, t, hi) for t in texts], rounds=3,
                       iterations=1)
