"""What a finished (or stopped) run leaves for a researcher: numbers, tables, plots, code.

Everything here is computed from three sources that survive a crash: the newest checkpoint (the
history of every generation, authoritative for phenotypes and fitness), ``events.jsonl`` (how
each candidate was answered, appended as answers arrive, across every session of the run), and
what the end of the run measured (the baseline, training curves). So the outputs of a run that
was killed and resumed are the outputs of the uninterrupted run: its counts too, which take each
(generation, candidate) once (`evaluation_counts`); the answers a resumed session gave again are
counted apart, as ``answered_again``, and the training time is all the time spent.

Files written into the run directory:
  summary.json       the run in numbers (schema in ``summary``)
  history.csv        one row per individual per generation
  hall_of_fame.json  the top programs, distinct by hash; hall_of_fame.md the same as a table
  report.md          the story, with plots/fitness.png, plots/curves.png, plots/size.png
  kernels/           ALR: generated Numba and Triton sources of the hall of fame
  best_optimizer.py  the best program as a standalone torch optimizer (engine.export)
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from codegen.ir import Program, Schedule, size as node_size
from engine.evolve import GenerationRecord
from engine.export import write_best_optimizer
from engine.store import not_reusable
from engine.tasks import FLOOR_FITNESS

__all__ = ["HALL_OF_FAME", "Outcome", "hall_of_fame", "program_size", "reason_kind", "write_all"]

HALL_OF_FAME = 10
HISTORY_COLUMNS = ("generation", "index", "elite", "hash", "fitness", "source", "reason", "size",
                   "program")


@dataclass
class Outcome:
    """Everything the outputs are made of. ``config`` is config.json; ``baseline`` and ``curves``
    come from the end of the run (``curves``: program hash -> {'val_acc': per-trial lists, ...})."""

    run_dir: Path
    config: dict
    history: list[GenerationRecord]
    events: list[dict]
    status: str
    baseline: dict | None = None
    curves: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


# -- small pure helpers ------------------------------------------------------------------------


def parse(mode: str, text: str) -> Program | Schedule:
    return Schedule.parse(text) if mode == "dlr" else Program.parse(text)


def program_size(mode: str, text: str) -> int:
    """Nodes of the canonical program: what a reader has to understand."""
    canonical = parse(mode, text).canonical()
    if isinstance(canonical, Schedule):
        return node_size(canonical.expr)
    return sum(node_size(e) for e in canonical.deltas().values() if e is not None)


def reason_kind(reason: str) -> str:
    """A failure reason without its particulars, for counting ('timeout', 'diverged'...)."""
    head, _, rest = reason.partition(":")
    if head == "screened":
        return "screened: " + re.split(r" (?:at step|on probe)", rest.strip())[0]
    return re.sub(r"\s*\(.*", "", head).strip()


def one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def hall_of_fame(mode: str, history: Sequence[GenerationRecord], k: int = HALL_OF_FAME) -> list[dict]:
    """The ``k`` fittest distinct programs (by hash) ever in the population, earliest first on
    ties, each with its canonical text, size and the generation it first appeared in. Programs
    at the floor fitness (broken, diverged, timed out) are not famous."""
    seen: dict[str, dict] = {}
    for record in history:
        for text, fitness in zip(record.phenotypes, record.fitness):
            program = parse(mode, text)
            entry = seen.get(program.hash)
            if entry is None:
                seen[program.hash] = {"hash": program.hash, "fitness": fitness, "program": text,
                                      "canonical": str(program.canonical()),
                                      "size": program_size(mode, text),
                                      "generation": record.generation}
    ranked = sorted((e for e in seen.values() if e["fitness"] > FLOOR_FITNESS),
                    key=lambda e: -e["fitness"])  # stable: earliest on ties
    return [{"rank": i + 1, **e} for i, e in enumerate(ranked[:k])]


def _answers(events: Iterable[dict]) -> dict[tuple[int, str], dict]:
    """(generation, text) -> its answer (`first_answers`)."""
    return {(e["generation"], e["text"]): e for e in first_answers(events) if "text" in e}


def first_answers(events: Iterable[dict]) -> list[dict]:
    """One answer per (generation, text), as an uninterrupted run would have given it.

    A session resumed mid-generation answers that generation again, mostly from the results
    store: the first answer is the real one, unless it was a failure that is not the
    candidate's own (`engine.store.not_reusable`), which is never stored and so was trained
    again; then the later answer is the one the checkpoint holds."""
    chosen: dict[tuple, dict] = {}
    for i, e in enumerate(events):
        if e.get("event") != "evaluation":
            continue
        # An answer that does not say what it answered (a hand-made log) counts on its own.
        key = (e["generation"], e["text"]) if "generation" in e and "text" in e else (i,)
        if key not in chosen or not_reusable(chosen[key].get("reason")):
            chosen[key] = e
    return list(chosen.values())


def evaluation_counts(events: Sequence[dict]) -> dict:
    """Answers by source and failures by kind, each (generation, candidate) once over every
    session; ``answered_again``: answers a resumed session repeated; ``train_seconds``: every
    training done, repeated ones included (time really spent)."""
    every = [e for e in events if e.get("event") == "evaluation"]
    answers = first_answers(every)
    sources = Counter(e["source"] for e in answers)
    failures = Counter(reason_kind(e["reason"]) for e in answers if e.get("reason"))
    return {"requested": len(answers), "trained": sources["trained"], "store": sources["store"],
            "screened": sources["screened"], "fingerprint": sources["fingerprint"],
            "failed": sources["failed"], "failures": dict(failures.most_common()),
            "answered_again": len(every) - len(answers),
            "train_seconds": round(sum(e.get("seconds", 0.0) for e in every
                                       if e["source"] == "trained"), 1)}


def wall_seconds(events: Sequence[dict]) -> tuple[float, int]:
    """(wall time summed over sessions, number of sessions): a session runs from its start
    event to the last event it wrote (a killed session writes no end event)."""
    total, sessions, start, last = 0.0, 0, None, None
    for e in events:
        if e.get("event") == "session":
            if start is not None:
                total += last - start
            start = last = e["time"]
            sessions += 1
        elif start is not None and "time" in e:
            last = e["time"]
    if start is not None:
        total += last - start
    return round(total, 1), sessions


# -- the files ---------------------------------------------------------------------------------


def summary(outcome: Outcome) -> dict:
    cfg, history, mode = outcome.config, outcome.history, outcome.config["mode"]
    best_text, best_fitness = max(((r.best_phenotype, r.best) for r in history),
                                  key=lambda pair: pair[1])  # max keeps the earliest maximum
    best = parse(mode, best_text)
    first = next(r.generation for r in history if best_text in r.phenotypes)
    seconds = {e["generation"]: e["seconds"] for e in outcome.events
               if e.get("event") == "generation"}
    wall, sessions = wall_seconds(outcome.events)
    baseline = outcome.baseline or {}
    return {
        "run": cfg["name"], "status": outcome.status, "mode": mode, "preset": cfg["preset"],
        "seed": cfg["seed"], "command": cfg["command"], "reproduce": cfg["reproduce"],
        "versions": outcome.versions,
        "generations_done": len(history), "generations": cfg["evolution"]["generations"],
        "population": cfg["evolution"]["population"],
        "best": {"program": best_text, "canonical": str(best.canonical()), "hash": best.hash,
                 "fitness": best_fitness, "size": program_size(mode, best_text),
                 "generation": first},
        "baseline": baseline,
        "best_minus_baseline": (round(best_fitness - baseline["fitness"], 6)
                                if "fitness" in baseline else None),
        "per_generation": [{"generation": r.generation, "best": r.best, "median": r.median,
                            "worst": r.worst, "evaluated": r.evaluated,
                            "seconds": seconds.get(r.generation)} for r in history],
        "evaluations": evaluation_counts(outcome.events),
        "wall_seconds": wall, "sessions": sessions,
    }


def write_history(path: Path, mode: str, history: Sequence[GenerationRecord],
                  events: Sequence[dict], elitism: int) -> None:
    answers = _answers(events)
    sizes: dict[str, int] = {}
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(HISTORY_COLUMNS)
        for record in history:
            for index, (text, fitness) in enumerate(zip(record.phenotypes, record.fitness)):
                elite = record.generation > 0 and index < elitism
                answer = answers.get((record.generation, text), {})
                if text not in sizes:
                    sizes[text] = program_size(mode, text)
                writer.writerow([record.generation, index, int(elite),
                                 answer.get("hash") or parse(mode, text).hash, repr(fitness),
                                 "elite" if elite else answer.get("source", ""),
                                 answer.get("reason") or "", sizes[text], one_line(text)])


def write_kernels(directory: Path, fame: Sequence[dict]) -> list[str]:
    """Numba and Triton sources of every hall-of-fame program (ALR), named by rank and hash."""
    from codegen.cache import source

    directory.mkdir(exist_ok=True)
    written = []
    for entry in fame:
        program = Program.parse(entry["program"])
        for backend in ("numba", "triton"):
            name = f"{entry['rank']:02d}-{entry['hash']}.{backend}.py"
            (directory / name).write_text(source(program, backend), encoding="utf-8")
            written.append(name)
    return written


def write_plots(directory: Path, outcome: Outcome, fame: Sequence[dict], best_hash: str) -> dict:
    """fitness.png, curves.png (when curves are known) and size.png; returns name -> path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(exist_ok=True)
    mode, history = outcome.config["mode"], outcome.history
    baseline = outcome.baseline or {}
    made = {}

    fig, ax = plt.subplots(figsize=(6.4, 4))
    gens = [r.generation for r in history]
    ax.plot(gens, [r.best for r in history], "o-", label="best")
    ax.plot(gens, [r.median for r in history], "s--", label="median")
    if "fitness" in baseline:
        ax.axhline(baseline["fitness"], color="grey", ls=":", label=baseline["name"])
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="generation", ylabel="fitness (accuracy)", title="Fitness per generation")
    ax.legend()
    made["fitness"] = _save(fig, directory / "fitness.png")

    curves = outcome.curves
    if best_hash in curves or baseline.get("hash") in curves:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for key, label, style in ((best_hash, "best", "-"),
                                  (baseline.get("hash"), baseline.get("name", "baseline"), "--")):
            for trial, values in enumerate((curves.get(key) or {}).get("val_acc", [])):
                ax.plot(range(1, len(values) + 1), values, style, marker=".",
                        label=f"{label}, trial {trial}" if trial or mode == "alr" else label)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set(xlabel="epoch", ylabel="validation accuracy",
               title="Training curves: best against the baseline")
        ax.legend()
        made["curves"] = _save(fig, directory / "curves.png")

    points: dict[str, tuple[int, float]] = {}
    for record in history:
        for text, fitness in zip(record.phenotypes, record.fitness):
            h = parse(mode, text).hash
            if h not in points:
                points[h] = (program_size(mode, text), fitness)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.scatter([p[0] for p in points.values()], [p[1] for p in points.values()], s=14,
               alpha=0.6, label="programs")
    ax.scatter([e["size"] for e in fame], [e["fitness"] for e in fame], s=30, marker="*",
               color="C3", label="hall of fame")
    if "fitness" in baseline:
        ax.axhline(baseline["fitness"], color="grey", ls=":", label=baseline["name"])
    ax.set(xlabel="program size (canonical nodes)", ylabel="fitness (accuracy)",
           title="Accuracy against program size", xscale="log")
    ax.legend()
    made["size"] = _save(fig, directory / "size.png")
    return made


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def write_all(outcome: Outcome) -> dict:
    """Write every output file; returns the summary (also written as summary.json)."""
    run_dir, cfg, mode = outcome.run_dir, outcome.config, outcome.config["mode"]
    data = summary(outcome)
    fame = hall_of_fame(mode, outcome.history)
    best = data["best"]
    write_history(run_dir / "history.csv", mode, outcome.history, outcome.events,
                  cfg["evolution"]["elitism"])
    _write_json(run_dir / "hall_of_fame.json", fame)
    (run_dir / "hall_of_fame.md").write_text(_fame_markdown(fame, mode), encoding="utf-8")
    kernels = write_kernels(run_dir / "kernels", fame) if mode == "alr" else []
    plots = write_plots(run_dir / "plots", outcome, fame, best["hash"])
    baseline = outcome.baseline or {}
    about = (f"Run {cfg['name']} (mode {mode}, preset {cfg['preset']}, seed {cfg['seed']}): "
             f"fitness {best['fitness']:.4f}"
             + (f" against {baseline['fitness']:.4f} for {baseline['name']} on the same protocol"
                if "fitness" in baseline else "") + ".")
    write_best_optimizer(run_dir / "best_optimizer.py", mode, best["program"], about=about)
    data["files"] = {"history": "history.csv", "hall_of_fame": "hall_of_fame.json",
                     "report": "report.md", "best_optimizer": "best_optimizer.py",
                     "plots": {k: f"plots/{v}" for k, v in plots.items()},
                     "kernels": [f"kernels/{k}" for k in kernels]}
    _write_json(run_dir / "summary.json", data)
    (run_dir / "report.md").write_text(_report_markdown(data, fame, plots, mode),
                                       encoding="utf-8")
    return data


def _write_json(path: Path, data: object) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(temp, path)


def _fame_markdown(fame: Sequence[dict], mode: str) -> str:
    lines = ["# Hall of fame", "",
             f"The {len(fame)} fittest distinct programs (by canonical hash) of the run.", "",
             "| rank | fitness | size | generation | hash | program |", "|---|---|---|---|---|---|"]
    for e in fame:
        program = one_line(e["canonical"]).replace("|", "\\|")
        lines.append(f"| {e['rank']} | {e['fitness']:.4f} | {e['size']} | {e['generation']} | "
                     f"`{e['hash']}` | `{program}` |")
    return "\n".join(lines) + "\n"


def _report_markdown(data: dict, fame: Sequence[dict], plots: dict, mode: str) -> str:
    best, baseline, counts = data["best"], data["baseline"], data["evaluations"]
    what = "an optimizer (ALR)" if mode == "alr" else "a learning-rate schedule (DLR)"
    lines = [f"# AutoLR run {data['run']}", "",
             f"Evolved {what} on the `{data['preset']}` preset, seed {data['seed']}: "
             f"{data['generations_done']} of {data['generations']} generations of "
             f"{data['population']}, status **{data['status']}**, "
             f"{_duration(data['wall_seconds'])} of wall time over {data['sessions']} "
             f"session(s).", "",
             "| | fitness | program size |", "|---|---|---|",
             f"| best evolved (`{best['hash']}`) | {best['fitness']:.4f} | {best['size']} |"]
    if "fitness" in baseline:
        lines.append(f"| {baseline['name']} (same protocol) | {baseline['fitness']:.4f} | "
                     f"{baseline.get('size', '')} |")
        delta = data["best_minus_baseline"]
        verdict = "beats" if delta > 0 else ("ties" if delta == 0 else "does not beat")
        lines += ["", f"The best evolved program {verdict} the baseline "
                      f"({delta:+.4f}). Fitness is the protocol's accuracy on a held-out fitness "
                      "set (ALR: the minimum over trials)."]
    lines += ["", "## The best program", "", "```", best["canonical"], "```", "",
              "`best_optimizer.py` is a standalone copy of it for your own project "
              "(needs only torch):", "", "```python",
              *(["from best_optimizer import BestOptimizer",
                 "optimizer = BestOptimizer(model.parameters())"] if mode == "alr" else
                ["from best_optimizer import BestSchedule, INITIAL_LR",
                 "optimizer = torch.optim.SGD(model.parameters(), lr=INITIAL_LR)",
                 "scheduler = BestSchedule(optimizer)  # scheduler.step() after every epoch"]),
              "```", ""]
    if mode == "alr":
        lines += ["Its generated kernels (and those of the whole hall of fame) are in `kernels/`: "
                  f"`kernels/01-{best['hash']}.numba.py` and `.triton.py`.", ""]
    lines += ["## Fitness per generation", "", f"![fitness per generation](plots/{plots['fitness']})",
              "", "| generation | best | median | worst | new programs | seconds |",
              "|---|---|---|---|---|---|"]
    for g in data["per_generation"]:
        secs = "" if g["seconds"] is None else f"{g['seconds']:.0f}"
        lines.append(f"| {g['generation']} | {g['best']:.4f} | {g['median']:.4f} | "
                     f"{g['worst']:.4f} | {g['evaluated']} | {secs} |")
    if "curves" in plots:
        lines += ["", "## Training curves", "",
                  "Validation accuracy per epoch of the best program and the baseline, retrained "
                  "(or recorded when first trained) under the fitness protocol.", "",
                  f"![training curves](plots/{plots['curves']})"]
    lines += ["", "## Accuracy against program size", "", f"![accuracy against size](plots/{plots['size']})",
              "", "## Hall of fame", "", "| rank | fitness | size | program |", "|---|---|---|---|"]
    for e in fame:
        lines.append(f"| {e['rank']} | {e['fitness']:.4f} | {e['size']} | "
                     f"`{one_line(e['canonical']).replace('|', chr(92) + '|')}` |")
    lines += ["", "## Evaluations", "",
              f"{counts['requested']} answers: {counts['trained']} trained "
              f"({_duration(counts['train_seconds'])} of training), {counts['store']} from the "
              f"results store, {counts['screened']} screened without training, "
              f"{counts['fingerprint']} behavioural twins (fingerprint), {counts['failed']} "
              "unparseable." + (f" A resumed session answered {counts['answered_again']} of "
                                "them again (counted once here)."
                                if counts.get("answered_again") else ""), ""]
    if counts["failures"]:
        lines += ["| failure | count |", "|---|---|"]
        lines += [f"| {kind} | {n} |" for kind, n in counts["failures"].items()]
        lines.append("")
    lines += ["## Reproduce", "", "```", data["reproduce"], "```", ""]
    return "\n".join(lines)


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
