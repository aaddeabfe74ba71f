"""Section 5 of bench/gpu/run.py: population-batched training against one candidate at a time.

The micro tier's shape (engine.fitness.tiers.DEFAULT_TIERS: a 784-64-32-10 MLP, batch 100, 90
steps = 3 epochs of a 3000-image chunk) on random images whose labels a fixed random projection
decides: learnable, so the two sides' accuracies can be compared, and no data set to install on
the GPU machine.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from kernels import EvolvedOptimizer, zoo

BATCH_PROGRAMS = ("adam", "rmsprop", "momentum", "sign", "adagrad", "nesterov", "lion",
                  "adabelief")
ALONE_SAMPLE = 16  # one-at-a-time cost does not depend on K: timed on this many, per candidate


def batch_members(k: int) -> list:
    from engine.tasks.batched import Member

    lrs = np.geomspace(1e-4, 3e-2, -(-k // len(BATCH_PROGRAMS)))
    return [Member(zoo.ZOO[name](), float(lr)) for lr in lrs for name in BATCH_PROGRAMS][:k]


def batch_data(device, inputs: int, n_train: int, n_val: int) -> tuple:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n_train + n_val, inputs, generator=gen)
    y = (x @ torch.randn(inputs, 10, generator=gen)).argmax(1)
    x, y = x.to(device), y.to(device)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def batched_rows(device, sizes: list[int], spec_shape: tuple, steps_per_epoch: int,
                 epochs: int, batch: int) -> list[tuple]:
    """Candidates per hour of `train_batch` (K members stacked, each member's Triton kernel on
    its arena row, one `kernel_segments` launch per program) against the engine's one-at-a-time
    training (`fit` with an EvolvedOptimizer on the Triton backend), same data and steps."""
    from engine.tasks.batched import KernelUpdate, train_batch
    from engine.tasks.compare_tasks import MLPSpec
    from engine.tasks.training import fit, loss_accuracy

    spec = MLPSpec(spec_shape[0], tuple(spec_shape[1:-1]), spec_shape[-1])
    train, val = batch_data(device, spec.inputs, steps_per_epoch * batch, 1000)
    protocol = dict(seed=11, batch_size=batch, max_epochs=epochs, patience=epochs)
    shape = "-".join(map(str, spec_shape)) + f", {steps_per_epoch * epochs} steps"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def alone(group) -> tuple[float, list[float]]:
        sync()
        start, accuracies = time.perf_counter(), []
        for member in group:
            model = spec.build(7).to(device)
            optimizer = EvolvedOptimizer(model.parameters(), member.program, backend="triton",
                                         lr=member.lr)
            fit(model, optimizer, train, val, **protocol)
            accuracies.append(loss_accuracy(model, *val)[1])
        sync()
        return time.perf_counter() - start, accuracies

    def batched(group, update) -> tuple[float, list[float]]:
        sync()
        start = time.perf_counter()
        results = train_batch(spec, group, train, val, init_seed=7, update=update, **protocol)
        sync()
        return time.perf_counter() - start, [r.accuracy for r in results]

    largest = batch_members(max(sizes))
    KernelUpdate([m.program for m in largest], "triton").warm_up(device)  # compiles untimed
    sample = largest[:min(ALONE_SAMPLE, max(sizes))]
    alone(sample[:len(BATCH_PROGRAMS)])  # every program's `kernel` compiled, untimed
    alone_s, alone_acc = alone(sample)
    alone_rate = 3600 * len(sample) / alone_s
    rows = [("batched", "one at a time: fit + EvolvedOptimizer", shape,
             1e3 * alone_s / len(sample), None, None, None,
             f"{alone_rate:,.0f} candidates/h (timed on {len(sample)})")]
    for k in sizes:
        group = largest[:k]
        update = KernelUpdate([m.program for m in group], "triton")
        batched(group, update)  # warm: cuBLAS handles, autograd's first pass
        seconds, accuracies = batched(group, update)
        rate = 3600 * k / seconds
        drift = max(abs(a - b) for a, b in zip(accuracies, alone_acc))
        rows.append(("batched", f"train_batch, K={k} stacked", shape, 1e3 * seconds / k, None,
                     None, None, f"{rate:,.0f} candidates/h, {rate / alone_rate:.1f}x one at "
                     f"a time; accuracy within {drift:.4f} of alone"))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
