"""The built-in task families at their default budgets: one Adam training each (default lr),
on one CPU thread, with the seconds it took and the validation metric it reached.

    PYTHONPATH=. python bench/bench_families.py [NAME ...]

BENCHMARKS.md records its output ("Built-in task families"). Data loading is not timed.
"""

from __future__ import annotations

import sys
import time

import torch


def main(names: list[str]) -> None:
    from engine.tasks.registry import FAMILIES, resolve
    from engine.tasks.supervised import load_data, supervised_fitness

    torch.set_num_threads(1)
    for name in names or [n for n in FAMILIES if n != "fmnist-cnn"]:
        task, _ = resolve(name)
        data = load_data(task)
        start = time.perf_counter()
        result = supervised_fitness(task, data, lambda m: torch.optim.Adam(m.parameters()),
                                    seed=0)
        seconds = time.perf_counter() - start
        fit = result.trials[0].fit
        print(f"{name:<11} {task.metric:<9} {result.fitness:.4f}  epochs {fit.epochs:>2} "
              f"(best {fit.best_epoch})  {seconds:5.2f} s  train {len(data.train[1])}")


if __name__ == "__main__":
    main(sys.argv[1:])
