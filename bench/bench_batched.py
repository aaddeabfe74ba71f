"""Population-batched training against one candidate at a time: candidates per hour, one thread.

Same programs (zoo optimizers at several lr scales, a realistic mix of update rules), same data,
same steps and evaluations on both sides; kernels are compiled before timing (compiles are the
interpreter's business, not this one's). The one-at-a-time side is what the engine runs today:
`engine.tasks.training.fit` with an `EvolvedOptimizer`, then the scoring pass. The targets (issue:
fidelity tiers) are 3x at the micro tier's MLP and 1.5x for the quick tier's CNN.

    PYTHONPATH=$PWD .venv/bin/python -m pytest bench/bench_batched.py --benchmark-only

Under `--benchmark-disable` each case only checks that it runs, on a handful of steps.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from engine.tasks.batched import KernelUpdate, Member, train_batch
from engine.tasks.data import DataNotFoundError
from engine.tasks.compare_tasks import MLPSpec, get_task, train_val
from engine.tasks.protocol import PRESETS, prepare
from engine.tasks.training import ModelSpec, configure_process, loss_accuracy, fit
from kernels import EvolvedOptimizer, zoo

pytestmark = pytest.mark.slow

PROGRAMS = ("adam", "rmsprop", "momentum", "sign", "adagrad", "nesterov", "lion", "adabelief")
LRS = (1e-3, 3e-3, 1e-2, 3e-2)
SEED, INIT = 11, 7


def members(k: int) -> list[Member]:
    return [Member(zoo.ZOO[name](), lr) for lr in LRS for name in PROGRAMS][:k]


@functools.cache
def digits() -> tuple:
    splits = train_val(get_task("digits"), 0)
    return splits.train, splits.val


@functools.cache
def fmnist(size: int) -> tuple:
    """The quick preset's first chunk and validation set, average-pooled to size x size when
    smaller than 28 (random images of that shape where Fashion-MNIST is not installed)."""
    try:
        data = prepare(PRESETS["quick"], seed=0)
        (x, y), (vx, vy) = data.chunks[0], data.val
    except DataNotFoundError:
        g = torch.Generator().manual_seed(0)
        x, vx = torch.randn(3000, 1, 28, 28, generator=g), torch.randn(1000, 1, 28, 28, generator=g)
        y, vy = torch.arange(3000) % 10, torch.arange(1000) % 10
    if size < 28:
        x, vx = F.avg_pool2d(x, 28 // size), F.avg_pool2d(vx, 28 // size)
    return (x, y), (vx, vy)


def one_at_a_time(spec, group, train, val, **protocol) -> None:
    for member in group:
        model = spec.build(INIT)
        optimizer = EvolvedOptimizer(model.parameters(), member.program,
                                     backend="numba", lr=member.lr)
        fit(model, optimizer, train, val, seed=SEED, **protocol)
        loss_accuracy(model, *val)


def batched(spec, group, train, val, **protocol) -> None:
    train_batch(spec, group, train, val, init_seed=INIT, seed=SEED, **protocol)


# (name, spec, data, protocol): the micro tier's MLPs run ~190 steps; the CNN is the quick
# preset's, on a third of its chunk for one epoch (its per-step cost is what matters).
CASES = {
    "mlp-digits": (MLPSpec(64, (32,)), digits,
                   dict(batch_size=32, max_epochs=6, patience=6)),
    "mlp-fmnist14": (MLPSpec(196, (64,)), lambda: fmnist(14),
                     dict(batch_size=100, max_epochs=6, patience=6)),
    "cnn-quick": (ModelSpec(conv1=16, conv2=32, dense=64), lambda: fmnist(28),
                  dict(batch_size=100, max_epochs=1, patience=1)),
}
SIZES = [("mlp-digits", 8), ("mlp-digits", 16), ("mlp-digits", 32), ("mlp-fmnist14", 8),
         ("mlp-fmnist14", 16), ("mlp-fmnist14", 32), ("cnn-quick", 8)]
DEFAULT = {("mlp-digits", 32)}  # the micro tier's headline; the rest behind --bench-long


@pytest.mark.parametrize("case, k", [
    pytest.param(c, k, id=f"{c}-k{k}",
                 marks=() if (c, k) in DEFAULT else pytest.mark.bench_long) for c, k in SIZES])
def test_candidates_per_hour(benchmark, interleaved, case, k):
    benchmark.group = "batched"
    configure_process(1)
    spec, data, protocol = CASES[case]
    train, val = data()
    if case == "cnn-quick":
        train, val = (train[0][:1000], train[1][:1000]), (val[0][:500], val[1][:500])
    group = members(k)
    KernelUpdate([m.program for m in group]).warm_up()  # compiles out of the timing
    if benchmark.disabled:  # `make test`: prove both sides run, on two members and a few steps
        train, val = (train[0][:200], train[1][:200]), (val[0][:100], val[1][:100])
        protocol = {**protocol, "max_epochs": 1, "patience": 1}
        one_at_a_time(spec, group[:2], train, val, **protocol)
        benchmark(batched, spec, group[:2], train, val, **protocol)
        return
    best = interleaved({"alone": lambda: one_at_a_time(spec, group, train, val, **protocol),
                        "batched": lambda: batched(spec, group, train, val, **protocol)},
                       repeat=2, warmup=1)
    benchmark.pedantic(batched, args=(spec, group, train, val), kwargs=protocol, rounds=1,
                       iterations=1)
    seconds = min(best["batched"], benchmark.stats.stats.min)
    benchmark.extra_info.update(
        members=k, threads=torch.get_num_threads(), steps_per_epoch=-(-len(train[1]) //
                                                                      protocol["batch_size"]),
        epochs=protocol["max_epochs"], alone_s=round(best["alone"], 3),
        batched_s=round(seconds, 3),
        alone_per_hour=round(3600 * k / best["alone"]),
        batched_per_hour=round(3600 * k / seconds),
        speedup_batched_over_one_at_a_time=round(best["alone"] / seconds, 2))
