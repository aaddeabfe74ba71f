"""Tier agreement: does the micro tier's score rank programs as the quick tier's fitness does?

The calibration set (the fidelity-tiers issue's "Tier agreement"): the ALR zoo seeds, mutations of them, and
random programs of the ALR grammar, each kept only when screening passes and its screening
fingerprint is new (as a run would train it). The quick-tier fitness of each is the expensive
part (2-120 s a program on one busy core: 220 took 40 minutes in two niced shards), so it is
computed once and cached in a JSON file, keyed by program text: tiers can then be compared again
and again against the same truth.

    # 1. the truth (background, resumable: rerun to continue after an interruption); with
    #    --shard I/N, one process per shard, each with its own cache file
    PYTHONPATH=$PWD nice -n 10 timeout 3h .venv/bin/python bench/calibrate_tiers.py quick \
        --programs 220 --cache /tmp/autolr_quick_fitness.json
    # 2. the agreement of each candidate micro tier with it
    PYTHONPATH=$PWD .venv/bin/python bench/calibrate_tiers.py micro \
        --cache /tmp/autolr_quick_fitness*.json

Prints, per candidate micro tier: Spearman's rho between micro score and quick fitness, how
many of the quick top 10 the micro top 25% keeps, and the micro tier's time per program.

    # 3. the lr grid (no cache needed): how much of each zoo optimizer's best micro score a grid
    #    of step size scales loses against a quarter-decade sweep over 1e-3..1e3
    PYTHONPATH=$PWD .venv/bin/python bench/calibrate_tiers.py grid
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np


MAX_DEPTH, MIN_DEPTH = 17, 4  # the quick ALR preset's


def calibration_programs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(origin, text) pairs: the zoo seeds, then mutations of them and random programs in turn,
    until `n` programs that pass screening with distinct fingerprints."""
    from codegen.ir import Program
    from engine.fitness.screening import fingerprint, screen
    from engine.evolution.grammar import ALR_GRAMMAR, load_grammar
    from engine.evolution.seeds import snap_all
    from engine.modes import ALR
    from engine.evolution.sge import individual_from_text, initialise, mutate

    grammar = load_grammar(ALR_GRAMMAR)
    rng = random.Random(seed)
    seeds = snap_all(ALR.zoo_seeds(), grammar, ALR, MAX_DEPTH)
    parents = [(name, individual_from_text(grammar, text, MAX_DEPTH, name))
               for name, text in seeds.items()]
    out: list[tuple[str, str]] = []
    seen: set[str] = set()

    def keep(origin: str, text: str) -> None:
        program = Program.parse(text)
        if screen(program) is not None:
            return
        print_ = fingerprint(program)
        if print_ not in seen:
            seen.add(print_)
            out.append((origin, text))

    for name, text in seeds.items():
        keep(f"zoo {name}", text)
    turn = 0
    while len(out) < n:
        turn += 1
        if turn % 2:
            name, parent = rng.choice(parents)
            p_mut = rng.choice([0.02, 0.05, 0.1, 0.2])
            child = mutate(grammar, parent, p_mut, MAX_DEPTH, rng)
            keep(f"mutation of {name} (p_mut {p_mut})", child.phenotype)
        else:
            keep("random", initialise(grammar, rng, MIN_DEPTH, MAX_DEPTH).phenotype)
    return out[:n]


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _save(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def quick(args: argparse.Namespace) -> None:
    """The quick tier's fitness of every calibration program, cached in `args.cache`."""
    import torch

    from engine import modes
    from engine.tasks.protocol import get_task

    torch.set_num_threads(1)
    cache = Path(args.cache)
    data = _load(cache)
    task, mode = get_task("quick"), modes.get("alr")
    programs = calibration_programs(args.programs, args.seed)
    shard, shards = (int(x) for x in args.shard.split("/"))
    for i, (origin, text) in enumerate(programs):
        if text in data or i % shards != shard:
            continue
        start = time.perf_counter()
        result = mode.train(task, mode.parse(text), seed=args.seed, time_limit=300.0,
                            backend="numba")
        data[text] = {"origin": origin, "fitness": result.fitness, "reason": result.reason,
                      "seconds": time.perf_counter() - start}
        _save(cache, data)
        print(f"{i + 1}/{len(programs)} {result.fitness:.4f} {origin} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def kept_top(micro: np.ndarray, truth: np.ndarray, top: int = 10, fraction: float = 0.25) -> int:
    """How many of the truth's `top` best the micro tier's best `fraction` keeps (ties in the
    truth broken by order, ties in the micro scores in the truth's favour: both stable)."""
    best = set(np.argsort(-truth, kind="stable")[:top].tolist())
    keep = set(np.argsort(-micro, kind="stable")[:max(1, int(np.ceil(fraction * len(micro))))]
               .tolist())
    return len(best & keep)


# Candidate micro tiers, by name: what `micro` compares (the two, their combination,
# the quick preset's own 28x28 images, wider and deeper MLPs, a tiny CNN, other budgets, and an
# lr grid whose best scale counts). The chosen one is engine.fitness.tiers.DEFAULT_TIERS[0].
CANDIDATES = {
    "fashion14-150": dict(tasks=("fashion14-mlp",), steps=150),
    "fashion14-300": dict(tasks=("fashion14-mlp",), steps=300),
    "digits-200": dict(tasks=("digits-mlp",), steps=200),
    "both-175": dict(tasks=("fashion14-mlp", "digits-mlp"), steps=175),
    "fashion14-150-lr3": dict(tasks=("fashion14-mlp",), steps=150, lr_scales=(0.5, 1.0, 2.0)),
    "fashion14w64-150": dict(tasks=("fashion14-mlp64",), steps=150),
    "fashion28-150": dict(tasks=("fashion28-mlp",), steps=150),
    "fashion28-60": dict(tasks=("fashion28-mlp",), steps=60),
    "fashion28-30": dict(tasks=("fashion28-mlp",), steps=30),
    "fashion28-15": dict(tasks=("fashion28-mlp",), steps=15),
    "fashion28-45": dict(tasks=("fashion28-mlp",), steps=45),
    "fashion28+digits-30": dict(tasks=("fashion28-mlp", "digits-mlp"), steps=30),
    "fashion28-30-lr3": dict(tasks=("fashion28-mlp",), steps=30, lr_scales=(0.5, 1.0, 2.0)),
    "fashion28w64-60": dict(tasks=("fashion28-mlp64",), steps=60),
    "fashion28deep-60": dict(tasks=("fashion28-deep",), steps=60),
    "fashion28deep-30": dict(tasks=("fashion28-deep",), steps=30),
    "fashion28deep-90": dict(tasks=("fashion28-deep",), steps=90),
    "fashion28deep-120": dict(tasks=("fashion28-deep",), steps=120),
    "fashion28deep-90x2": dict(tasks=("fashion28-deep",), steps=90, seeds=2),
    "fashion28deep-150": dict(tasks=("fashion28-deep",), steps=150),
    "fashion28deep128-60": dict(tasks=("fashion28-deep128",), steps=60),
    "fashion14cnn-30": dict(tasks=("fashion14-cnn",), steps=30),
    "fashion14cnn-60": dict(tasks=("fashion14-cnn",), steps=60),
}


def _more_tasks() -> None:
    """Micro tasks tried here besides the library's (engine.fitness.micro.MICRO_TASKS)."""
    from engine.fitness.micro import MICRO_TASKS, MicroTask
    from engine.tasks.compare_tasks import MLPSpec
    from engine.tasks.training import ModelSpec

    for task in (MicroTask("fashion14-mlp64", MLPSpec(196, (64,)), 100, "fashion14"),
                 MicroTask("fashion28-mlp64", MLPSpec(784, (64,)), 100, "fashion28"),
                 MicroTask("fashion28-deep128", MLPSpec(784, (128, 64)), 100, "fashion28"),
                 MicroTask("fashion14-cnn", ModelSpec(4, 8, 16, image_size=14), 100,
                           "fashion14-images")):
        MICRO_TASKS.setdefault(task.name, task)


def micro_scores(name: str, texts: list[str], seed: int) -> np.ndarray:
    """Each text's micro score under candidate tier `name` (best lr scale)."""
    from engine.fitness.tiers import Funnel, Tier, micro_scorer

    _more_tasks()
    tier = Tier("micro", **CANDIDATES[name])
    funnel = Funnel([tier], {"micro": micro_scorer(tier, seed=seed)})
    return np.array([s.score for s in funnel.evaluate(texts)])


def micro(args: argparse.Namespace) -> None:
    """Each candidate micro tier's agreement with the cached quick fitnesses."""
    import torch

    torch.set_num_threads(1)
    data = {}
    for path in args.cache:
        data.update(_load(Path(path)))
    texts = list(data)
    truth = np.array([data[t]["fitness"] for t in texts])
    print(f"{len(texts)} programs ({sum('random' in data[t]['origin'] for t in texts)} random, "
          f"{sum('mutation' in data[t]['origin'] for t in texts)} mutations), "
          f"{int((truth > 0.7).sum())} with quick fitness > 0.7")
    from engine.fitness.micro import MICRO_TASKS, micro_data

    _more_tasks()
    for name in args.tiers or list(CANDIDATES):
        for task in CANDIDATES[name]["tasks"]:  # the data load is not the tier's cost
            micro_data(MICRO_TASKS[task].source, args.seed)
        start = time.perf_counter()
        scores = micro_scores(name, texts, args.seed)
        seconds = time.perf_counter() - start
        trains = truth > 0.2  # the programs the quick tier trained beyond chance
        print(f"{name}: spearman {spearman(scores, truth):.3f} (on the {int(trains.sum())} with "
              f"quick fitness > 0.2: {spearman(scores[trains], truth[trains]):.3f}), quick top "
              f"10 kept by the micro top 25%: {kept_top(scores, truth)}/10, "
              f"{seconds / len(texts) * 1000:.0f} ms a program ({seconds:.0f} s)", flush=True)


def grid(args: argparse.Namespace) -> None:
    """Per zoo optimizer (each reads lr, so a scale is its lr): the best micro score over a fine
    sweep, where it lies, and what coarser grids (spacing x range) lose against it."""
    import torch

    from engine.fitness.micro import score_micro
    from kernels import zoo

    torch.set_num_threads(1)
    fine = [10 ** (k / 4) for k in range(-12, 13)]
    for name in ("adam", "rmsprop", "momentum", "nesterov", "lion", "adagrad", "sign"):
        v = np.array(score_micro(("fashion28-deep",), 90,
                                 [(str(getattr(zoo, name)()), s) for s in fine], seed=args.seed))
        cells = []
        for step, label in ((4, "decade"), (2, "half-decade")):
            for reach in (4, 8, 12):  # quarter decades either side of lr 1
                idx = [i for i in range(len(fine)) if (i - 12) % step == 0 and abs(i - 12) <= reach]
                cells.append(f"{label} +-{reach / 4:g} ({len(idx)} pts) -{v.max() - v[idx].max():.3f}")
        print(f"{name}: best {v.max():.3f} at lr {fine[int(v.argmax())]:.3g}; " + "; ".join(cells),
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quick", help="compute (or continue) the quick-tier fitness cache")
    q.add_argument("--programs", type=int, default=220)
    q.add_argument("--shard", default="0/1", help="I/N: only programs I, I+N, ... (one process "
                   "per shard, each with its own --cache file)")
    q.add_argument("--cache", default="/tmp/autolr_quick_fitness.json")
    m = sub.add_parser("micro", help="compare candidate micro tiers with the cache")
    m.add_argument("--cache", nargs="+", default=["/tmp/autolr_quick_fitness.json"],
                   help="the quick runs' cache files (one per shard)")
    for p in (q, m):
        p.add_argument("--seed", type=int, default=0)
    sub.choices["micro"].add_argument("--tiers", nargs="*", help="names of candidate tiers")
    g = sub.add_parser("grid", help="what coarse lr grids lose against a fine sweep")
    g.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    {"quick": quick, "micro": micro, "grid": grid}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
