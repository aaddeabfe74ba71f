"""The comparison's statistics and outputs: per-row summaries, the paired tests, the tables
(markdown, terminal), the plot and the files of `--out` (see engine.compare.tuning for the
protocol and engine.compare.stats for each statistical choice)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from codegen.ir import Program
from engine.compare import stats
from engine.tasks.protocol import FLOOR_FITNESS, derive_seed

_BOOTSTRAP = 14  # seed purpose of the bootstrap (engine.compare.tuning has 11-13)
ALPHA = 0.05  # family-wise error rate of a table (Holm)
RESAMPLES = 10_000  # bootstrap resamples per interval


def _results(row: dict) -> list[tuple[int, float | None]]:
    """A row's (seed, test accuracy) pairs; None where the run diverged or never ran."""
    return [(r["seed"], None if r["reason"] else r["test_acc"]) for r in row["seeds"]]


def paired_comparison(mine: dict, theirs: dict, seed: int) -> dict:
    """One candidate row against one baseline row, paired by seed (see `engine.compare.stats`); a seed
    that only one of them ran is a ValueError, never silently left out."""
    return {"candidate": mine["name"], "baseline": theirs["name"],
            **stats.compare_pair(_results(mine), _results(theirs), FLOOR_FITNESS, seed,
                                 RESAMPLES)}


def summarise(report: dict) -> None:
    """Adds per-row statistics and the paired comparisons (`report["comparisons"]`), in place.

    Every candidate is compared with every baseline; Holm's correction runs over all of those
    comparisons together, since a reader scans the whole table for a win."""
    rows = report["rows"]
    for row in rows:
        accs = [r["test_acc"] for r in row["seeds"]]
        row["test"] = {"mean": float(np.mean(accs)) if accs else None,
                       "sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                       "median": float(np.median(accs)) if accs else None,
                       "n": len(accs),
                       "diverged": sum(r["reason"] is not None for r in row["seeds"])}
    ranked = sorted((r for r in rows if r["role"] == "baseline"), key=lambda r: -r["test"]["mean"])
    report["best_baseline"] = ranked[0]["name"] if ranked else None
    boot = derive_seed(report["seed"], _BOOTSTRAP, bits=31)
    found = [paired_comparison(c, b, boot) for c in rows if c["role"] == "candidate"
             for b in rows if b["role"] == "baseline"]
    for entry, adjusted in zip(found, stats.holm([e["p"] for e in found])):
        entry["p_holm"] = adjusted
        significant = adjusted < ALPHA and entry["direction"] != 0
        entry["verdict"] = ("better" if entry["direction"] > 0 else "worse") if significant \
            else "not distinguishable"
    report["comparisons"] = found
    report["stats"] = {
        "pairing": "by seed: seed k has the same initial weights, batch order and dropout in "
                   "every row",
        "test": "Wilcoxon signed-rank on candidate - baseline test accuracy, two-sided; zero "
                "differences by Pratt's method",
        "correction": f"Holm over all {len(found)} comparisons, alpha {ALPHA}",
        "effect": f"median and mean paired difference, percentile bootstrap 95% interval "
                  f"({RESAMPLES} resamples of seed pairs, seed {boot})",
        "floor": FLOOR_FITNESS, "alpha": ALPHA, "bootstrap_seed": boot,
        "resamples": RESAMPLES}


# -- the outputs ------------------------------------------------------------------------------

COLUMNS = ("optimizer", "tuned", "tuning val %", "diverged trials", "test acc % (mean ± sd)",
           "diverged seeds")
PAIRED_COLUMNS = ("candidate", "vs baseline", "wins/ties/losses", "median Δ pp [95% CI]",
                  "mean Δ pp [95% CI]", "p", "Holm p", "verdict")


def _p(value: float) -> str:
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def table_rows(report: dict) -> list[list[str]]:
    """The table as strings: the same for the markdown, the terminal and the tests.

    `tuned` is the chosen learning rate ("lr 1e-3") or step factor ("x0.5"), and the weight
    decay where it was tuned ("wd 0.01"), marked "(low edge)" / "(high edge)" (or "(weight decay
    low edge)") when it lies at an end of the search range."""
    out = []
    for row in report["rows"]:
        t, tuning = row["test"], row["tuning"]
        name = row["name"] + (" *" if row["role"] == "candidate" else "")
        if row["lr"] is None:
            lr = "failed"
        else:
            lr = f"lr {row['lr']:.3g}" if row["tuned"] == "learning rate" else f"x{row['lr']:.3g}"
            if row.get("weight_decay") is not None:
                lr += f", wd {row['weight_decay']:.3g}"
            edges = [f"{k} " * (k != "lr") + f"{v} edge"
                     for k, v in (tuning.get("edge") or {}).items() if v]
            lr += f" ({', '.join(edges)})" if edges else ""
        val = "-" if tuning is None else f"{tuning['best_val'] * 100:.2f}"
        trials = "-" if tuning is None else f"{tuning['diverged']}/{report['trials']}"
        acc = f"{t['mean'] * 100:.2f} ± {t['sd'] * 100:.2f}"
        out.append([name, lr, val, trials, acc, f"{t['diverged']}/{t['n']}"])
    return out


def paired_rows(report: dict) -> list[list[str]]:
    """The paired table as strings: one row per (candidate, baseline) comparison."""
    def interval(ci: dict) -> str:
        return f"{ci['estimate'] * 100:+.2f} [{ci['low'] * 100:+.2f}, {ci['high'] * 100:+.2f}]"

    return [[c["candidate"], c["baseline"], f"{c['wins']}/{c['ties']}/{c['losses']}",
             interval(c["median"]), interval(c["mean"]), _p(c["p"]), _p(c["p_holm"]),
             c["verdict"]] for c in report.get("comparisons", [])]


def verdicts(report: dict) -> list[str]:
    """One line per candidate: which baselines it beats or loses to, and how that was tested."""
    found = report.get("comparisons", [])
    lines = []
    for name in dict.fromkeys(c["candidate"] for c in found):
        mine = [c for c in found if c["candidate"] == name]
        parts = [f"{word} {', '.join(c['baseline'] for c in mine if c['verdict'] == key)}"
                 for key, word in (("better", "better than"), ("worse", "worse than"),
                                   ("not distinguishable", "not distinguishable from"))
                 if any(c["verdict"] == key for c in mine)]
        n = min(c["n"] for c in mine)
        floor = min(1.0, len(found) * stats.smallest_p(n))
        many = f"{len(found)} comparison{'s' * (len(found) != 1)}"
        small = (f" With {n} seeds and {many} the smallest Holm-corrected p is "
                 f"{floor:.3g}: no difference can reach {ALPHA}; run more seeds."
                 if floor >= ALPHA else "")
        lines.append(f"{name}: {'; '.join(parts)} (two-sided Wilcoxon signed-rank on {n} "
                     f"seed pairs, Holm-corrected over {many}, "
                     f"threshold {ALPHA}).{small}")
    return lines


def _decay_note(report: dict) -> str:
    tuned = [r["name"] for r in report["rows"] if r.get("weight_decay") is not None]
    if not tuned:
        return ""
    low, high = report["wd_range"]
    return (f" ({' and '.join(tuned)} also their decoupled weight decay, log-uniform over "
            f"[{low:g}, {high:g}], in the same trials)")


COST_COLUMNS = ("optimizer", "step ms (median)", "step × Adam", "state bytes/param",
                "memory × Adam")


def cost_rows(report: dict) -> list[list[str]]:
    """The cost table as strings: step time and state memory, each also against Adam's."""
    def show(value: float | None, form: str) -> str:
        return "failed" if value is None else format(value, form)

    return [[name, show(None if c["step_seconds"] is None else c["step_seconds"] * 1e3, ".3g"),
             show(c["step_vs_adam"], ".2f"), show(c["bytes_per_param"], "g"),
             show(c["memory_vs_adam"], ".2f")]
            for name, c in (report.get("costs") or {}).items()]


def cost_lines(report: dict) -> list[str]:
    rows = cost_rows(report)
    if not rows:
        return []
    return ["", "## Cost", "",
            "Per optimizer at its tuned values on this task's model: the median time of "
            "`optimizer.step()` alone (one CPU thread, after warm-up steps, fixed seeded "
            "gradients) and the bytes of its per-weight state tensors per parameter (Adam's "
            "two float32 moments: 8), each also as a ratio to Adam's.", "",
            "| " + " | ".join(COST_COLUMNS) + " |", "|" + "---|" * len(COST_COLUMNS),
            *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(report: dict) -> str:
    task = report["task"]
    lines = [f"# Compare on `{task['name']}`", "", f"{task['about']}; {task['epochs']} epochs, "
             f"batch {task['batch_size']}.", "",
             f"Tuning: {report['trials']} TPE trials per optimizer (each optimizer its own "
             f"sampler seed, {report['sampler']['n_startup_trials']} random trials first), "
             f"log-uniform over [{report['lr_range'][0]:g}, {report['lr_range'][1]:g}]"
             f"{_decay_note(report)}, scored on the validation split. Then {report['seeds']} "
             "seeds each on the tuned value, the same seeds for every optimizer; test accuracy "
             "of each run's best-validation epoch. A diverged run counts at accuracy 0 and is "
             "never dropped. `*` marks the candidate; \"(low edge)\" / \"(high edge)\": the tuned "
             "value lies within 5% of the log-range of that end, so the best value may lie "
             "outside it.", "",
             *([report["mode_note"], ""] if report.get("mode_note") else []),
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    if report.get("comparisons"):
        st = report["stats"]
        lines += ["", "## Paired comparisons", "",
                  f"Each candidate against each baseline on the same seeds (Δ = candidate - "
                  f"baseline, percentage points). Test: {st['test']}. Correction: "
                  f"{st['correction']}. Effect: {st['effect']}.", "",
                  "| " + " | ".join(PAIRED_COLUMNS) + " |", "|" + "---|" * len(PAIRED_COLUMNS)]
        lines += ["| " + " | ".join(r) + " |" for r in paired_rows(report)]
    lines += ["", *verdicts(report)]
    reasons = sorted({r["reason"].split(" at epoch")[0] for row in report["rows"]
                      for r in row["seeds"] if r["reason"]})
    if reasons:
        lines += ["", "Runs that did not finish: " + "; ".join(reasons) + "."]
    lines += ["", "Programs (`lr` is the tuned value; compare.json has every program as run):", ""]
    for row in report["rows"]:
        if row["role"] == "candidate":
            scaled = row["note"] if "note" in row else \
                "" if Program.parse(row["program"]).reads_lr else \
                ", its weight update scaled by the tuned factor (EvolvedOptimizer's lr)"
            lines += [f"- {row['name']} ({row['source']}), run as: "
                      f"`{'; '.join(row['program'].splitlines())}`{scaled}"]
        else:
            lines += [f"- {row['name']}: {row['source']}"]
    lines += cost_lines(report)
    s = report["seconds"]
    lines += ["", f"Wall time {s['total']:.0f} s (tuning {s['tuning']:.0f} s, seeds "
                  f"{s['seeds']:.0f} s) with {report['workers']} worker(s).",
              f"Command: `{report.get('command', '')}`", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in report["rows"]:
        curves = [r["val_curve"] for r in row["seeds"] if r["reason"] is None and r["val_curve"]]
        style = "-" if row["role"] == "candidate" else "--"
        div = row["test"]["diverged"]
        label = row["name"] + (f" ({div} diverged)" if div else "")
        if curves:
            length = min(map(len, curves))
            mean = np.mean([c[:length] for c in curves], axis=0)
            left.plot(range(1, length + 1), mean * 100, style, marker="o", ms=3, label=label)
        if row["tuning"]:
            pts = sorted((t["lr"], t["val_acc"]) for t in row["tuning"]["trials"])
            right.plot([p[0] for p in pts], [p[1] * 100 for p in pts], style, marker="o", ms=3,
                       label=row["name"])
    left.set(xlabel="epoch", ylabel="validation accuracy (%)",
             title=f"{report['task']['name']}: mean over {report['seeds']} seeds (tuned)")
    right.set(xscale="log", xlabel="learning rate / step factor",
              ylabel="best validation accuracy (%)", title="tuning trials (0 = diverged)")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "compare.json", "markdown": out / "compare.md",
             "plot": out / "curves.png"}
    paths["json"].write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown(report))
    plot(report, paths["plot"])
    return paths


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['task']['name']}: test accuracy over {report['seeds']} seeds "
                        f"({report['trials']} tuning trials each)")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("optimizer", "vs") else "right",
                         no_wrap=column in ("optimizer", "tuned", "test acc % (mean ± sd)"))
    for cells in table_rows(report):
        table.add_row(*cells)
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # a log file gets whole tables, line by line
    console.print(table)
    if report.get("comparisons"):
        paired = Table(title="paired by seed: candidate - baseline (two-sided Wilcoxon, Holm)")
        for column in PAIRED_COLUMNS:
            paired.add_column(column, justify="left" if column in (
                "candidate", "vs baseline", "verdict") else "right", no_wrap=True)
        for cells in paired_rows(report):
            paired.add_row(*cells)
        console.print(paired)
    for line in verdicts(report):
        console.print(line)


# -- the CLI ----------------------------------------------------------------------------------
