"""The micro tier's throughput: distinct candidates scored per hour, every lr scale included,
batched with the IR interpreter (engine.fitness.micro) against one candidate at a time.

The candidates are a realistic mix: the ALR zoo seeds, mutations of them and random programs of
the ALR grammar, kept only when screening passes and their fingerprint is new (the calibration
set of bench/calibrate_tiers.py). The micro tier is DEFAULT_TIERS[0] (task, steps, lr scales).
The one-at-a-time side is what the engine runs today for a candidate: `engine.tasks.training.fit`
with an `EvolvedOptimizer` per (candidate, lr scale), then the scoring pass, with every kernel
compiled before timing: the compile a new program costs there is left out of the ratio, which
is so a floor; `compile_s` (those compiles, cold when $AUTOLR_CACHE starts empty) and
`alone_with_compile_per_hour` say what it would add. One thread; the local pool runs one such
worker per core.

    PYTHONPATH=$PWD .venv/bin/python -m pytest bench/bench_tiers.py --benchmark-only --bench-long

Under `--benchmark-disable` the case only checks that both sides run, on a few steps.
"""

from __future__ import annotations

import time

import pytest
import torch

from calibrate_tiers import calibration_programs
from engine.fitness.micro import MICRO_TASKS, micro_data, score_micro
from engine.fitness.tiers import DEFAULT_TIERS
from engine.tasks.training import configure_process, fit, loss_accuracy
from kernels import EvolvedOptimizer, compile as compile_kernel

pytestmark = [pytest.mark.slow, pytest.mark.bench_long]  # minutes: 64 compiles, 2 rounds

N_PROGRAMS = 64
SEED = 0


def one_at_a_time(task, jobs, train, val, steps: int) -> None:
    epochs = -(-steps * task.batch_size // len(train[1]))
    for text, scale in jobs:
        model = task.spec.build(SEED)
        optimizer = EvolvedOptimizer(model.parameters(), text, backend="numba", lr=scale)
        fit(model, optimizer, train, val, seed=SEED, batch_size=task.batch_size,
            max_epochs=epochs, patience=epochs)
        loss_accuracy(model, *val)


def test_micro_tier_candidates_per_hour(benchmark, interleaved):
    benchmark.group = "tiers"
    configure_process(1)
    tier = DEFAULT_TIERS[0]
    texts = [text for _, text in calibration_programs(N_PROGRAMS)]
    jobs = [(t, s) for t in texts for s in tier.lr_scales]
    steps = tier.steps
    task = MICRO_TASKS[tier.tasks[0]]
    train, val = micro_data(task.source, SEED)
    if benchmark.disabled:  # `make test`: both sides run, on two candidates and a few steps
        one_at_a_time(task, jobs[:2], train, val, 5)
        benchmark(score_micro, tier.tasks, 5, jobs[:2])
        return
    start = time.perf_counter()
    for text in texts:
        compile_kernel(text, "numba").warm_up()  # out of the timing: the floor of the ratio
    compile_s = time.perf_counter() - start  # cold with an empty $AUTOLR_CACHE, else from disk
    best = interleaved({"alone": lambda: one_at_a_time(task, jobs, train, val, steps),
                        "batched": lambda: score_micro(tier.tasks, steps, jobs)},
                       repeat=2, warmup=1)
    benchmark.pedantic(score_micro, args=(tier.tasks, steps, jobs), rounds=1, iterations=1)
    seconds = min(best["batched"], benchmark.stats.stats.min)
    benchmark.extra_info.update(
        candidates=len(texts), lr_scales=list(tier.lr_scales), steps=steps, task=task.name,
        threads=torch.get_num_threads(), alone_s=round(best["alone"], 3),
        batched_s=round(seconds, 3),
        alone_per_hour=round(3600 * len(texts) / best["alone"]),
        compile_s=round(compile_s, 3),
        alone_with_compile_per_hour=round(3600 * len(texts) / (best["alone"] + compile_s)),
        batched_per_hour=round(3600 * len(texts) / seconds),
        speedup_batched_over_one_at_a_time=round(best["alone"] / seconds, 2))
