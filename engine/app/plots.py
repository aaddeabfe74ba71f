"""A run's plots (plots/ in its directory): fitness per generation, the best program's and the
baseline's training curves, and fitness against program size. engine.app.report writes them with
the rest of the outputs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # engine.app.report imports this module
    from engine.app.report import Phenotypes, RunOutputs

__all__ = ["curves_figure", "write_plots"]


def curves_figure(outcome: RunOutputs, best_hash: str, best_fitness: float | None = None):
    """The best program's and the baseline's training curves, or None when neither is known.

    The curves and the fitness are measured on different splits, and the plot says so: a
    curve is accuracy on the validation split after each epoch (what early stopping watches),
    the fitness is accuracy on the separate fitness split with the best epoch's weights
    restored (ALR: the minimum over trials). So a curve's peak need not equal the fitness;
    the fitness is drawn as a level line in each program's colour."""
    plt = _pyplot()

    curves, baseline = outcome.curves, outcome.baseline or {}
    if best_hash not in curves and baseline.get("hash") not in curves:
        return None
    per_trial = outcome.config.mode.min_over_trials
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    for color, key, label, fitness, style in (
            ("C0", best_hash, "best", best_fitness, "-"),
            ("C1", baseline.get("hash"), baseline.get("name", "baseline"),
             baseline.get("fitness"), "--")):
        for trial, values in enumerate((curves.get(key) or {}).get("val_acc", [])):
            name = f"{label}, trial {trial}" if trial or per_trial else label
            ax.plot(range(1, len(values) + 1), values, style, marker=".", color=color,
                    alpha=1.0 if trial == 0 else 0.5, label=f"{name}: validation split")
        if key in curves and fitness is not None:
            what = "min over trials, " if per_trial else ""
            ax.axhline(fitness, color=color, ls=":",
                       label=f"{label}: fitness {fitness:.4f} ({what}fitness split)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="epoch",
           ylabel="accuracy (curves: validation split;\ndotted: fitness split)",
           title="Training curves: best against the baseline")
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.13))
    return fig


def write_plots(directory: Path, outcome: RunOutputs, fame: Sequence[dict], best_hash: str,
                best_fitness: float | None, parsed: Phenotypes) -> dict:
    """fitness.png, curves.png (when curves are known) and size.png; returns name -> path."""
    plt = _pyplot()
    directory.mkdir(exist_ok=True)
    history = outcome.history
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

    fig = curves_figure(outcome, best_hash, best_fitness)
    if fig is not None:
        made["curves"] = _save(fig, directory / "curves.png")

    points: dict[str, tuple[int, float]] = {}
    for record in history:
        for text, fitness in zip(record.phenotypes, record.fitness):
            h = parsed.program(text).hash
            if h not in points:
                points[h] = (parsed.size(text), fitness)
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never a window, never a display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name
