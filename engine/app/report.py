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
  best_program.txt   the best program's text, as Program.parse / Schedule.parse read it
  hall_of_fame.json  the top programs, distinct by hash and by behaviour; hall_of_fame.md too
  report.md          the story, with plots/fitness.png, plots/curves.png, plots/size.png
  kernels/           ALR: generated Numba and Triton sources of the hall of fame
  best_optimizer.py  the best program as a standalone torch optimizer (engine.modes.export)
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from codegen.ir import Program, Schedule
from engine import modes
from engine.fitness import outcomes
from engine.app.plots import write_plots
from engine.evolution.evolve import GenerationRecord
from engine.modes.export import write_best_optimizer
from engine.modes import Mode
from engine.fitness.outcomes import detail as reason_kind
from engine.rundir import write_json
from engine.fitness.store import not_reusable
from engine.tasks.protocol import FLOOR_FITNESS

if TYPE_CHECKING:  # run_config imports the grammar and the seeds: not needed to report
    from engine.app.config import RunConfig

__all__ = ["HALL_OF_FAME", "Phenotypes", "RunOutputs", "hall_of_fame", "reason_kind", "write_all"]

HALL_OF_FAME = 10
HISTORY_COLUMNS = ("generation", "index", "elite", "hash", "fitness", "source", "reason", "size",
                   "program")


@dataclass
class RunOutputs:
    """Everything the outputs are made of. ``config`` is the run's settings; ``baseline`` and
    ``curves`` come from the end of the run (``curves``: program hash -> {'val_acc': per-trial
    lists, ...})."""

    run_dir: Path
    config: RunConfig
    history: list[GenerationRecord]
    events: list[dict]
    status: str
    baseline: dict | None = None
    curves: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    tiers: list[dict] | None = None  # a funnel run's per-tier figures (Funnel.summary())
    # summary.json's best.lr_scale and best.tasks (Session._best_detail); None: an older run's
    best_detail: dict | None = None
    lr_scales: Callable[[str], float] | None = None  # a program text's best step size scale


# -- small pure helpers ------------------------------------------------------------------------


class Phenotypes:
    """Each distinct phenotype text of a run parsed once, with its size: the summary, the hall
    of fame, history.csv, the plots and the kernels all read programs, and a history repeats
    most texts (elites, re-derived programs) generation after generation."""

    def __init__(self, mode: str | Mode) -> None:
        self.mode = modes.get(mode)
        self._programs: dict[str, Program | Schedule] = {}
        self._sizes: dict[str, int] = {}

    def program(self, text: str) -> Program | Schedule:
        found = self._programs.get(text)
        if found is None:
            found = self._programs[text] = self.mode.parse(text)
        return found

    def size(self, text: str) -> int:
        """Nodes of the canonical program: what a reader has to understand."""
        found = self._sizes.get(text)
        if found is None:
            found = self._sizes[text] = self.mode.size(self.program(text))
        return found


def one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def hall_of_fame(mode: str | Mode | Phenotypes, history: Sequence[GenerationRecord],
                 k: int = HALL_OF_FAME, preset: str | None = None) -> list[dict]:
    """The ``k`` fittest distinct programs ever in the population, earliest first on ties, each
    with its canonical text, size and the generation it first appeared in. Distinct means a
    different canonical hash *and* a different behaviour (`engine.modes.Mode.behaviour`: ALR,
    the screening fingerprint; DLR, the learning rates over the protocol's epochs): of programs
    that behave alike only the fittest (earliest on ties) is listed, the others' hashes in its
    ``twins``. Programs at the floor fitness (broken, diverged, timed out) are not famous."""
    parsed = mode if isinstance(mode, Phenotypes) else Phenotypes(mode)
    seen: dict[str, dict] = {}
    for record in history:
        for text, fitness in zip(record.phenotypes, record.fitness):
            program = parsed.program(text)
            if program.hash not in seen:
                seen[program.hash] = {"hash": program.hash, "fitness": fitness, "program": text,
                                      "canonical": str(program.canonical()),
                                      "size": parsed.size(text),
                                      "generation": record.generation, "twins": []}
    ranked = sorted((e for e in seen.values() if e["fitness"] > FLOOR_FITNESS),
                    key=lambda e: -e["fitness"])  # stable: earliest on ties
    fame: list[dict] = []
    by_behaviour: dict[str, dict] = {}
    for entry in ranked:
        key = parsed.mode.behaviour(parsed.program(entry["program"]), preset)
        if key in by_behaviour:
            by_behaviour[key]["twins"].append(entry["hash"])
            continue
        if len(fame) == k:
            continue  # still read the rest: a listed program's twins are named
        by_behaviour[key] = entry
        fame.append(entry)
    return [{"rank": i + 1, **e} for i, e in enumerate(fame)]


def _answers(events: Iterable[dict]) -> dict[tuple[int, str], dict]:
    """(generation, text) -> its answer (`first_answers`)."""
    return {(e["generation"], e["text"]): e for e in first_answers(events) if "text" in e}


def first_answers(events: Iterable[dict]) -> list[dict]:
    """One answer per (generation, text), as an uninterrupted run would have given it.

    A session resumed mid-generation answers that generation again, mostly from the results
    store: the first answer is the real one, unless it was a failure that is not the
    candidate's own (`engine.fitness.store.not_reusable`), which is never stored and so was trained
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
    """The work done over every session, each (generation, candidate) once (`first_answers`):
    answers per outcome kind (engine.fitness.outcomes) and failure reasons within the kinds;
    ``answered_again``: answers a resumed session repeated; ``trainings`` and ``train_seconds``:
    every training that ran, repeated ones and any outcome included (time really spent)."""
    every = [e for e in events if e.get("event") == "evaluation"]
    answers = first_answers(every)
    reasons = Counter(reason_kind(e["reason"]) for e in answers if e.get("reason"))
    trainings = [e for e in every if e["source"] == "trained"]
    count, seconds = len(trainings), sum(e.get("seconds", 0.0) for e in trainings)
    funnel = [e for e in events if e.get("event") == "funnel" and "trainings" in e]
    if funnel:  # a funnel run trains each candidate at several tasks, scales and seeds
        count = sum(e["trainings"] for e in funnel)
        seconds = sum(e["train_seconds"] for e in funnel)
    return {"requested": len(answers), "outcomes": outcomes.count(answers),
            "reasons": dict(reasons.most_common()), "answered_again": len(every) - len(answers),
            "trainings": count, "train_seconds": round(seconds, 1)}


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


def summary(outcome: RunOutputs, parsed: Phenotypes | None = None) -> dict:
    cfg, history, mode = outcome.config, outcome.history, outcome.config.mode
    parsed = parsed or Phenotypes(mode)
    best_text, best_fitness = max(((r.best_phenotype, r.best) for r in history),
                                  key=lambda pair: pair[1])  # max keeps the earliest maximum
    best = parsed.program(best_text)
    first = next(r.generation for r in history if best_text in r.phenotypes)
    seconds = {e["generation"]: e["seconds"] for e in outcome.events
               if e.get("event") == "generation"}
    wall, sessions = wall_seconds(outcome.events)
    baseline = outcome.baseline or {}
    score = best_fitness
    extra: dict = {}
    if outcome.tiers:
        # A funnel fitness is 2 * tier level + the score there (engine.fitness.tiers.Standing):
        # the baseline compares with the score, an accuracy like its own fitness.
        level = min(int(best_fitness // 2), len(outcome.tiers) - 1)
        score = round(best_fitness - 2 * level, 6)
        extra = {"tier": outcome.tiers[level]["name"], "score": score}
    summary = {
        "run": cfg.name, "status": outcome.status, "mode": mode.name, "preset": cfg.preset,
        "seed": cfg.seed, "command": cfg.command, "reproduce": cfg.reproduce,
        "versions": outcome.versions,
        **({"task": cfg.task} if cfg.task else {}),  # a preset run's summary is unchanged
        "generations_done": len(history), "generations": cfg.evolution.generations,
        "population": cfg.evolution.population,
        "best": {"program": best_text, "canonical": str(best.canonical()), "hash": best.hash,
                 "fitness": best_fitness, "size": parsed.size(best_text),
                 "generation": first, **extra},
        "baseline": baseline,
        "best_minus_baseline": (round(score - baseline["fitness"], 6)
                                if "fitness" in baseline else None),
        "per_generation": [{"generation": r.generation, "best": r.best, "median": r.median,
                            "worst": r.worst, "evaluated": r.evaluated,
                            "seconds": seconds.get(r.generation)} for r in history],
        "evaluations": evaluation_counts(outcome.events),
        "wall_seconds": wall, "sessions": sessions,
    }
    if outcome.tiers:  # a run without the funnel keeps its summary as it was
        summary["tiers"] = outcome.tiers
    if cfg.seeds:  # how far evolution moved from what it was given (constants left out)
        from engine.evolution.structure import nearest_seed

        name, distance = nearest_seed(best_text, cfg.seeds)
        summary["best"]["nearest_seed"] = {"name": name, "distance": distance}
    detail = outcome.best_detail
    if detail is not None:
        summary["best"].update(lr_scale=detail["lr_scale"], tasks=detail["tasks"])
        if detail.get("normalised"):
            # Its score is already relative to the baseline (0.5 = a tie; the minimum over the
            # tasks): the baseline's own accuracy on the run's task does not compare with it.
            summary["best"]["relative"] = min(t["relative"] for t in detail["tasks"])
            summary["best_minus_baseline"] = None
    return summary


def write_history(path: Path, mode: str | Mode | Phenotypes,
                  history: Sequence[GenerationRecord], events: Sequence[dict],
                  elitism: int) -> None:
    parsed = mode if isinstance(mode, Phenotypes) else Phenotypes(mode)
    answers = _answers(events)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(HISTORY_COLUMNS)
        for record in history:
            for index, (text, fitness) in enumerate(zip(record.phenotypes, record.fitness)):
                elite = record.generation > 0 and index < elitism
                answer = answers.get((record.generation, text), {})
                writer.writerow([record.generation, index, int(elite),
                                 answer.get("hash") or parsed.program(text).hash, repr(fitness),
                                 "elite" if elite else answer.get("source", ""),
                                 answer.get("reason") or "", parsed.size(text), one_line(text)])


def write_kernels(directory: Path, fame: Sequence[dict], parsed: Phenotypes) -> list[str]:
    """Numba and Triton sources of every hall-of-fame program (ALR), named by rank and hash."""
    from codegen.cache import source

    directory.mkdir(exist_ok=True)
    written = []
    for entry in fame:
        program = parsed.program(entry["program"])
        for backend in ("numba", "triton"):
            name = f"{entry['rank']:02d}-{entry['hash']}.{backend}.py"
            (directory / name).write_text(source(program, backend), encoding="utf-8")
            written.append(name)
    return written


def write_all(outcome: RunOutputs) -> dict:
    """Write every output file; returns the summary (also written as summary.json)."""
    run_dir, cfg, mode = outcome.run_dir, outcome.config, outcome.config.mode
    parsed = Phenotypes(mode)
    data = summary(outcome, parsed)
    fame = hall_of_fame(parsed, outcome.history, preset=cfg.preset)
    if outcome.lr_scales is not None:  # the step size scale each famous program scored at
        fame = [{**entry, "lr_scale": outcome.lr_scales(entry["program"])} for entry in fame]
    best = data["best"]
    # The one text form every reader of programs accepts (Program.parse, Schedule.parse,
    # EvolvedOptimizer, codegen show, --seed-programs).
    (run_dir / "best_program.txt").write_text(str(parsed.program(best["program"])) + "\n",
                                              encoding="utf-8")
    write_history(run_dir / "history.csv", parsed, outcome.history, outcome.events,
                  cfg.evolution.elitism)
    write_json(run_dir / "hall_of_fame.json", fame)
    (run_dir / "hall_of_fame.md").write_text(_fame_markdown(fame), encoding="utf-8")
    kernels = write_kernels(run_dir / "kernels", fame, parsed) if mode.compiled else []
    plots = write_plots(run_dir / "plots", outcome, fame, best["hash"], best["fitness"], parsed)
    baseline = outcome.baseline or {}
    about = (f"Run {cfg.name} (mode {mode.name}, preset {cfg.preset}, seed {cfg.seed}): "
             f"fitness {best['fitness']:.4f}"
             + (f" against {baseline['fitness']:.4f} for {baseline['name']} on the same protocol"
                if "fitness" in baseline else "") + ".")
    write_best_optimizer(run_dir / "best_optimizer.py", mode, best["program"], about=about,
                         lr=best.get("lr_scale", 1.0))
    data["files"] = {"best_program": "best_program.txt", "history": "history.csv",
                     "hall_of_fame": "hall_of_fame.json",
                     "report": "report.md", "best_optimizer": "best_optimizer.py",
                     "plots": {k: f"plots/{v}" for k, v in plots.items()},
                     "kernels": [f"kernels/{k}" for k in kernels]}
    write_json(run_dir / "summary.json", data)
    (run_dir / "report.md").write_text(_report_markdown(data, fame, plots, mode),
                                       encoding="utf-8")
    return data


def _fame_markdown(fame: Sequence[dict]) -> str:
    lines = ["# Hall of fame", "",
             f"The {len(fame)} fittest distinct programs of the run: different canonical forms "
             "that also behave differently (programs that behave alike are listed once, as "
             "the fittest of them).", "",
             "| rank | fitness | lr scale | size | generation | hash | alike | program |",
             "|---|---|---|---|---|---|---|---|"]
    for e in fame:
        program = one_line(e["canonical"]).replace("|", "\\|")
        lines.append(f"| {e['rank']} | {e['fitness']:.4f} | {e.get('lr_scale', 1.0):g} | "
                     f"{e['size']} | {e['generation']} | `{e['hash']}` | "
                     f"{len(e.get('twins', ()))} | `{program}` |")
    if any(e.get("twins") for e in fame):
        lines += ["", "alike: other programs of the run (other texts, other hashes) that behave "
                      "as the listed one and are not listed again (`twins` in hall_of_fame.json)."]
    return "\n".join(lines) + "\n"


def _report_markdown(data: dict, fame: Sequence[dict], plots: dict, mode: Mode) -> str:
    best, baseline, counts = data["best"], data["baseline"], data["evaluations"]
    lines = [f"# AutoLR run {data['run']}", "",
             f"Evolved {mode.evolves} on "
             + (f"the task `{data['task']}` (search size `{data['preset']}`)" if data.get("task")
                else f"the `{data['preset']}` preset")
             + f", seed {data['seed']}: "
             f"{data['generations_done']} of {data['generations']} generations of "
             f"{data['population']}, status **{data['status']}**, "
             f"{_duration(data['wall_seconds'])} of wall time over {data['sessions']} "
             f"session(s).", "",
             "| | fitness | program size |", "|---|---|---|",
             f"| best evolved (`{best['hash']}`) | {best['fitness']:.4f} | {best['size']} |"]
    if "relative" in best:
        verdict = "beats" if best["relative"] > 0.5 else (
            "ties" if best["relative"] == 0.5 else "does not beat")
        lines += ["", f"The best evolved program {verdict} {baseline.get('name', 'the baseline')} "
                      f"on its worst task: relative score {best['relative']:.4f} (0.5 = a tie; "
                      "per task below)."]
    elif "fitness" in baseline:
        lines.append(f"| {baseline['name']} (same protocol) | {baseline['fitness']:.4f} | "
                     f"{baseline.get('size', '')} |")
        delta = data["best_minus_baseline"]
        verdict = "beats" if delta > 0 else ("ties" if delta == 0 else "does not beat")
        lines += ["", f"The best evolved program {verdict} the baseline "
                      f"({delta:+.4f}). "
                      + ("Fitness is the task's metric on its validation split, best epoch "
                         "restored." if data.get("task") else
                         "Fitness is the protocol's accuracy on a held-out fitness set (ALR: "
                         "the minimum over trials).")]
    near = best.get("nearest_seed")
    lines += ["", "## The best program", "", *_fenced(best["canonical"]), "",
              *([f"Its tree is {near['distance']} edit(s) (insert, delete or relabel a node of "
                 f"the canonical tree, constants left out) from its nearest seed, "
                 f"{near['name']}.", ""] if near else []),
              "`best_optimizer.py` is a standalone copy of it for your own project "
              "(needs only torch):", "", "```python",
              *mode.usage, "```", "", *_tasks_markdown(best, baseline)]
    if mode.compiled:
        lines += ["Its generated kernels (and those of the whole hall of fame) are in `kernels/`: "
                  f"`kernels/01-{best['hash']}.numba.py` and `.triton.py`.", ""]
    lines += ["## Fitness per generation", "", f"![fitness per generation](plots/{plots['fitness']})",
              "", "| generation | best | median | worst | new programs | seconds |",
              "|---|---|---|---|---|---|"]
    for g in data["per_generation"]:
        secs = "" if g["seconds"] is None else f"{g['seconds']:.0f}"
        lines.append(f"| {g['generation']} | {g['best']:.4f} | {g['median']:.4f} | "
                     f"{g['worst']:.4f} | {g['evaluated']} | {secs} |")
    lines += _curves_markdown(plots, bool(data.get("task")), mode)
    lines += ["", "## Accuracy against program size", "", f"![accuracy against size](plots/{plots['size']})",
              "", "## Hall of fame", "", "| rank | fitness | lr scale | size | program |",
              "|---|---|---|---|---|"]
    for e in fame:
        lines.append(f"| {e['rank']} | {e['fitness']:.4f} | {e.get('lr_scale', 1.0):g} | "
                     f"{e['size']} | "
                     f"`{one_line(e['canonical']).replace('|', chr(92) + '|')}` |")
    lines += ["", *_evaluations_markdown(counts), *_tiers_markdown(data.get("tiers"))]
    lines += ["## Reproduce", "", *_fenced(data["reproduce"]), ""]
    return "\n".join(lines)


def _tasks_markdown(best: dict, baseline: dict) -> list[str]:
    """The best program per task against the baseline (summary.json's best.tasks)."""
    if not best.get("tasks"):
        return []
    name = baseline.get("name", "the baseline")
    lines = [f"It scored best at step size scale **{best['lr_scale']:g}** (its update times "
             f"that; `best_optimizer.py`'s default lr). Per task, at that scale, against "
             f"{name} at its own best scale of the same grid (relative: 1 / (1 + error / "
             "baseline's error), 0.5 = a tie):", "",
             "| task | best | baseline | relative |", "|---|---|---|---|"]
    for t in best["tasks"]:
        cells = ["" if t[k] is None else f"{t[k]:.4f}" for k in ("score", "baseline", "relative")]
        lines.append(f"| {t['task']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _curves_markdown(plots: dict, task: bool, mode: Mode) -> list[str]:
    """The training-curves section: what the curves and the dotted fitness line measure."""
    if "curves" not in plots:
        return []
    if task:
        return ["", "## Training curves", "",
               "The task's metric on its validation split after each epoch (what early "
               "stopping watches) of the best program and the baseline; the fitness is its "
               "best epoch's, drawn as a dotted level line.", "",
               f"![training curves](plots/{plots['curves']})"]
    return ["", "## Training curves", "",
               "Accuracy on the validation split after each epoch (what early stopping "
               "watches) of the best program and the baseline, retrained (or recorded when "
               "first trained) under the fitness protocol. The fitness is measured on a "
               "different split, the fitness split, with the best epoch's weights restored "
               + ("(the minimum over trials)" if mode.min_over_trials else "")
               + ": it is drawn as a dotted level line, and a curve's peak need not equal it.",
               "",
               f"![training curves](plots/{plots['curves']})"]


def _tiers_markdown(tiers: list[dict] | None) -> list[str]:
    """The funnel: how many candidates each tier scored and passed on. A funnel fitness is
    2 * tier level + the score at that tier, so every promoted candidate ranks above every one
    that stopped lower."""
    if not tiers:
        return []
    lines = ["## Fidelity tiers", "",
             "Every candidate that passed screening was scored on the first tier; the best of "
             "each tier went on to the next. Fitness is 2 x the highest tier reached (0 = "
             "first) + the score there.", "",
             "| tier | evaluated | promoted | seconds |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['evaluated']} | {t['promoted']} | {t['seconds']:.0f} |"
              for t in tiers]
    return lines + [""]


def _evaluations_markdown(counts: dict) -> list[str]:
    """The report's "Evaluations" section: how many answers of each kind, and why runs failed."""
    lines = ["## Evaluations", "",
              f"{counts['requested']} answers, each of one kind below; {counts['trainings']} "
              f"trainings ran ({_duration(counts['train_seconds'])} of training, whatever "
              "their outcome)." + (f" A resumed session answered {counts['answered_again']} of "
                                   "them again (counted once here)."
                                   if counts.get("answered_again") else ""),
              "", "| outcome | count | meaning |", "|---|---|---|"]
    lines += [f"| {kind.name} | {counts['outcomes'][kind.name]} | {kind.meaning} |"
              for kind in outcomes.KINDS]
    lines.append("")
    if counts["reasons"]:
        lines += ["| failure reason | count |", "|---|---|"]
        lines += [f"| {reason} | {n} |" for reason, n in counts["reasons"].items()]
        lines.append("")
    return lines


def _fenced(text: str) -> list[str]:
    """A Markdown code block holding `text` verbatim: its fence is longer than any run of
    backticks in it (a path in the command line may hold some), which would otherwise end it."""
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence, text, fence]


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
