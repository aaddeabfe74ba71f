"""Showing a run: the live display of `engine.run`, and `python -m engine.show RUN_DIR`.

`engine.show` reads only files (summary.json when the run has finished, else its newest
checkpoint and events.jsonl), so it works on a run that is still going, was stopped, or was
copied from another machine, and never touches the results store.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, \
    TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from engine import modes
from engine.fitness import outcomes
from engine.evolution.evolve import GenerationRecord
from engine.app.report import evaluation_counts, hall_of_fame, one_line, wall_seconds
from engine.modes import Mode
from engine.rundir import CHECKPOINTS, EVENTS, newest_checkpoint, read_events
from engine.app.config import RunConfig

__all__ = ["Display", "main", "print_summary"]

TOP = 5  # programs in the live table


def _short(text: str, width: int) -> str:
    line = one_line(text)
    return line if len(line) <= width else line[: width - 1] + "…"


class Display:
    """Progress of the running generation and of the run, and the best programs so far.

    On a terminal: rich progress bars with a status line and a live table, with one permanent
    line per generation. Elsewhere (a log file, a test): plain lines only, one per status
    change and one per generation. Counts use engine.fitness.outcomes' kinds, as every other output.
    """

    def __init__(self, config: RunConfig, history: list[GenerationRecord], events: list[dict],
                 baseline: tuple[str, float] | None, workers: int,
                 console: Console | None = None) -> None:
        self.config, self.mode = config, config.mode
        self.console = console or Console()
        self.live_mode = self.console.is_terminal
        self.baseline = baseline
        self.workers = workers
        self.generations = config.evolution.generations
        self.best: dict[str, tuple[float, str]] = {}  # hash -> (fitness, text)
        for record in history:
            for text, fitness in zip(record.phenotypes, record.fitness):
                self._note(None, text, fitness)
        self.counts: dict[str, int] = outcomes.zero()
        self.funnel: list[dict] = []  # the last generation's tiers (a funnel run's session sets it)
        # The ETA is the mean time of the generations this session finished: none before the
        # first one, when all there is to go on is start-up (worker imports, data, compiles).
        self.session_seconds: list[float] = []
        self.statuses: list[str] = []  # every status shown, in order (the log of start-up)
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description:<14}"), BarColumn(bar_width=30),
            MofNCompleteColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"), console=self.console)
        self.run_task = self.progress.add_task("run", total=self.generations,
                                               completed=len(history), detail="", eta="")
        self.gen_task = None
        self.generation = len(history)
        self.live: Live | None = None
        where = (f"{config.executor} executor, {workers} worker{'s' * (workers != 1)}")
        self.message(f"AutoLR {self.mode.title} run [bold]{escape(config.name)}[/] "
                     f"({f'task {escape(config.task)}, ' if config.task else ''}"
                     f"preset {config.preset}, seed {config.seed}, population "
                     f"{config.evolution.population}, {self.generations} generations, "
                     f"{where})\nwriting to {escape(str(config.out))}"
                     + (f"\nresuming after generation {len(history) - 1}" if history else ""),
                     markup=True)

    def __enter__(self) -> Display:
        if self.live_mode:
            self.live = Live(self._renderable(), console=self.console, refresh_per_second=4,
                             transient=True)
            self.live.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)
            self.live = None

    def message(self, text: str, markup: bool = False) -> None:
        """Print a line above the live display. `text` is plain unless `markup` says it is rich
        markup: paths and commands hold brackets that rich would read as (broken) tags."""
        if self.live_mode:
            self.console.print(text, highlight=False, markup=markup)
        else:  # a log: plain lines, never wrapped at an imagined width
            print(Text.from_markup(text).plain if markup else text, file=self.console.file,
                  flush=True)

    def status(self, text: str, log: bool = True) -> None:
        """What the run is doing now, where no bar says it (start-up, the end): on the run bar
        on a terminal; elsewhere a plain line, unless ``log`` is False (routine news that
        would only repeat the generation lines in a log)."""
        if self.statuses and self.statuses[-1] == text:
            return
        self.statuses.append(text)
        if self.live_mode:
            self.progress.update(self.run_task, detail=text)
            self._refresh()
        elif log:
            self.message(f"... {text}")

    def eta(self) -> str:
        """'eta 1:23' once this session finished a generation, else '' (no guess)."""
        if not self.session_seconds:
            return ""
        done = self.progress.tasks[self.run_task].completed
        left = max(0.0, (self.generations - done) * sum(self.session_seconds)
                   / len(self.session_seconds))
        minutes, seconds = divmod(int(round(left)), 60)
        return f"eta {minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else \
            f"eta {minutes}:{seconds:02d}"

    def _note(self, h: str | None, text: str, fitness: float) -> None:
        if h is None:
            try:
                h = self.mode.parse(text).hash
            except ValueError:
                return
        old = self.best.get(h)
        if old is None or fitness > old[0]:
            self.best[h] = (fitness, str(self.mode.parse(text).canonical()))

    def _detail(self) -> str:
        return outcomes.describe(self.counts)

    def _table(self) -> Table:
        width = max(30, self.console.width - 40)
        table = Table(title="best so far", title_justify="left", expand=False)
        for column in ("#", "fitness", "size", "hash", "program"):
            table.add_column(column, no_wrap=True, overflow="ellipsis",
                             max_width=width if column == "program" else None)
        ranked = sorted(self.best.items(), key=lambda kv: -kv[1][0])[:TOP]
        for i, (h, (fitness, text)) in enumerate(ranked, 1):
            table.add_row(str(i), f"{fitness:.4f}", str(self.mode.size(text)), h[:10],
                          _short(text, width))
        if self.baseline is not None:
            table.caption = f"baseline {self.baseline[0]}: {self.baseline[1]:.4f}"
        return table

    def _renderable(self):
        return Group(self.progress, self._table())

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._renderable())

    def start_generation(self, generation: int, size: int) -> None:
        self.counts = outcomes.zero()
        if self.gen_task is not None:
            self.progress.remove_task(self.gen_task)
        self.gen_task = self.progress.add_task(f"generation {generation}", total=size,
                                               detail=self._detail(), eta="")
        self.generation = generation
        if not self.session_seconds:  # the first trainings of a session wait for start-up
            serial = self.config.executor == "serial"
            who = ("in this process" if serial else f"on {self.workers} "
                   f"{self.config.executor} worker{'s' * (self.workers != 1)}")
            waits = ", ".join((["worker start-up"] if not serial else []) + ["data loading"]
                              + (["kernel compiles"] if self.mode.compiled else []))
            screening = "screening candidates, then " if self.mode.screened else ""
            self.status(f"generation {generation}: {screening}the first trainings {who} "
                        f"({waits})")
        else:
            self.status(f"generation {generation}: evaluating {size} candidates", log=False)

    def answered(self, evaluation) -> None:
        self.counts[outcomes.kind_of(evaluation.source, evaluation.reason)] += 1
        if evaluation.source == "trained" and not self.session_seconds:
            self.status(f"generation {self.generation}: training (start-up done)")
        if evaluation.hash:
            self._note(evaluation.hash, evaluation.text, evaluation.fitness)
        if self.gen_task is not None:
            self.progress.update(self.gen_task, advance=1, detail=self._detail())
        self._refresh()

    def generation_done(self, record: GenerationRecord, seconds: float) -> None:
        self.session_seconds.append(seconds)
        self.progress.update(self.run_task, completed=record.generation + 1)
        self.progress.update(self.run_task, eta=self.eta())
        funnel = ("  funnel " + " > ".join(f"{t['evaluated']} {t['name']}" for t in self.funnel)
                  if self.funnel else "")
        self.message(f"gen {record.generation:>3}/{self.generations - 1}  "
                     f"best {tiered(self.config, record.best)}  "
                     f"median {tiered(self.config, record.median)}  new {record.evaluated:>3} "
                     f"({self._detail()}){funnel}  {seconds:.0f} s")
        self._refresh()


def tiered(config: RunConfig | _Header, fitness: float) -> str:
    """A fitness as a reader wants it: for a funnel run, the score at the tier it reached and that
    tier's name ("0.8167 top") rather than the selection's 2 * level + score."""
    if not config.tiers:
        return f"{fitness:.4f}"
    from engine.fitness.tiers import split_fitness

    level, score = split_fitness(fitness)
    names = [str(t.get("name", "?")) if isinstance(t, dict) else "?" for t in config.tiers]
    return f"{score:.4f} {names[min(level, len(names) - 1)]}"


def print_summary(summary: dict, out: Path, console: Console | None = None) -> None:
    """The end-of-run (or `engine.show`) summary: best against the baseline, the work done."""
    console = console or Console()
    best, base, counts = summary["best"], summary.get("baseline") or {}, summary["evaluations"]
    table = Table(title=escape(f"AutoLR run {summary['run']}: {summary['status']}"),
                  show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("mode / preset / seed", f"{summary['mode']} / {summary['preset']} / "
                                          f"{summary['seed']}")
    table.add_row("generations", f"{summary['generations_done']} of {summary['generations']}, "
                                 f"population {summary['population']}")
    table.add_row("best fitness", f"{best['fitness']:.4f} "
                  + (f"(tier {best['tier']}, score {best['score']:.4f}; " if "tier" in best
                     else "(") + f"hash {best['hash']}, size "
                                  f"{best['size']}, generation {best['generation']})")
    if "relative" in best:
        table.add_row("baseline", f"{base.get('name', '?')}: the best's relative score "
                                  f"{best['relative']:.4f} on its worst of "
                                  f"{len(best['tasks'])} task(s) (0.5 = a tie)")
    elif "fitness" in base:
        table.add_row("baseline", f"{base['fitness']:.4f} {base['name']} "
                                  f"({summary['best_minus_baseline']:+.4f} for the best)")
    table.add_row("best program", escape(best["canonical"]))
    table.add_row("evaluations", escape(_evaluations(counts)))
    if summary.get("tiers"):
        table.add_row("fidelity tiers", " > ".join(
            f"{t['name']} {t['evaluated']} ({t['seconds']:.0f} s)" for t in summary["tiers"]))
    table.add_row("failure reasons",
                  escape(", ".join(f"{k} {v}" for k, v in counts["reasons"].items()) or "none"))
    wall = summary.get("wall_seconds")
    table.add_row("wall time", "?" if wall is None else
                  f"{wall:.0f} s over {summary.get('sessions', 1)} session(s)")
    mode = modes.find(summary["mode"])
    table.add_row("outputs", escape(f"{out}/report.md, best_program.txt, best_optimizer.py, "
                                    "summary.json, history.csv"
                                    + (", kernels/" if mode and mode.compiled else "")))
    console.print(table)


def _evaluations(counts: dict) -> str:
    """The answers by outcome kind, in engine.fitness.outcomes' words (as the live display and
    report.md), and the trainings that ran."""
    return (f"{counts['requested']} answered: {outcomes.describe(counts['outcomes'], sep=', ')}"
            f" ({counts['trainings']} trainings ran)")


def _fame_table(fame: list[dict], width: int) -> Table:
    table = Table(title="hall of fame", title_justify="left")
    for column in ("#", "fitness", "size", "gen", "hash", "alike", "program"):
        table.add_column(column, overflow="fold" if column == "program" else "ellipsis")
    for e in fame:  # alike: programs of other texts that behave as this one (not listed)
        cells = (str(e["rank"]), f"{e['fitness']:.4f}", str(e["size"]), str(e["generation"]),
                 e["hash"][:10], str(len(e.get("twins", ()))), one_line(e["canonical"]))
        table.add_row(*map(escape, cells))  # the file's text is shown as text, never markup
    return table


# A damaged file (a disk filled up, a copy cut short, an editor) costs only what it holds:
# engine.show is for looking at a run, and the one who asks wants its results, most of which
# the other files still hold (summary.json and hall_of_fame.json are rebuilt from the checkpoint,
# which has its own checksum). So each damaged file is one warning line on stderr, naming it and
# what to do, and the rest is shown (exit 0); only when nothing is left to show is it an error.

_MALFORMED = (KeyError, TypeError, ValueError, AttributeError)  # complete JSON, wrong contents


@dataclass(frozen=True)
class _Header:
    """The run's identity, as the overview of a run without a summary shows it."""

    name: object
    mode: Mode
    preset: object
    seed: object
    generations: object
    tiers: list | None = None  # a funnel run's tiers (RunConfig.tiers), for `tiered`


class _Files:
    """Reads a run's files, noting each damaged one instead of failing on it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.resume = shlex.join(["python", "-m", "engine.run", "--resume", "--out",
                                  str(run_dir)])
        self.warnings: list[str] = []

    def warn(self, path: Path, problem: str, instead: str) -> None:
        self.warnings.append(f"engine.show: warning: {path} is damaged "
                             f"({' '.join(problem.split())}); {instead}")

    def json(self, name: str, instead: str) -> object:
        """The file's JSON; None when it is missing, or damaged (noted)."""
        path = self.run_dir / name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data is None:  # None means missing or damaged to the callers
                raise ValueError("it holds only null")
            return data
        except FileNotFoundError:
            return None
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            self.warn(path, str(err), instead)
            return None

    def config(self) -> _Header | None:
        """What the overview needs from config.json: from a RunConfig when the file is whole,
        else from the few keys it needs, so a file a resume would refuse still shows."""
        instead = "--resume cannot continue the run without it: restore it from a copy of the run"
        data = self.json("config.json", instead)
        if data is None:
            return None
        try:
            whole = RunConfig.from_json(data)
        except ValueError:
            pass
        else:
            return _Header(whole.name, whole.mode, whole.preset, whole.seed,
                           whole.evolution.generations, whole.tiers)
        if (_has(data, "name", "mode", "preset", "seed", "evolution")
                and _has(data["evolution"], "generations")
                and modes.find(data["mode"]) is not None):
            tiers = data.get("tiers") if isinstance(data.get("tiers"), list) else None
            return _Header(data["name"], modes.get(data["mode"]), data["preset"], data["seed"],
                           data["evolution"]["generations"], tiers)
        self.warn(self.run_dir / "config.json", "not an AutoLR run config", instead)
        return None

    def history(self) -> list[GenerationRecord]:
        """The newest checkpoint's history, as a resume would continue from it."""
        scan = newest_checkpoint(self.run_dir / CHECKPOINTS)
        if scan.body is not None:
            return [GenerationRecord.from_json(r) for r in scan.body["history"]]
        if scan.refused:
            self.warn(self.run_dir / CHECKPOINTS, str(scan.refused[0]),
                      "no generation can be shown from them")
        return []

    def events(self) -> list[dict]:
        path = self.run_dir / EVENTS
        log = read_events(path)
        if log.damaged:
            self.warn(path, f"{len(log.bad)} of {log.lines} lines are not events, the first "
                            f"line {log.bad[0]}",
                      "they are skipped: the counts and times may fall short")
        return log.events


def _has(data: object, *keys: str) -> bool:
    return isinstance(data, dict) and all(key in data for key in keys)


def show(run_dir: Path, console: Console | None = None) -> int:
    console = console or Console()
    if not (run_dir / "config.json").is_file():
        print(f"engine.show: error: {run_dir} is not an AutoLR run directory (no config.json)",
              file=sys.stderr)
        return 2
    files = _Files(run_dir)
    shown = _show(files, console)
    if not shown:
        print(f"engine.show: error: nothing to show: {run_dir}/config.json is damaged and the "
              "run has no usable summary.json; restore config.json from a copy of the run",
              file=sys.stderr)
        return 2
    for line in files.warnings:
        print(line, file=sys.stderr)
    return 0


def _show(files: _Files, console: Console) -> bool:
    """Print what the files hold; False when config.json and summary.json are both unusable."""
    config, history = files.config(), files.history()
    rebuild = f"showing the checkpoint instead ({files.resume} rewrites it)"
    summary = files.json("summary.json", rebuild)
    if summary is not None and not (_has(summary, "generations_done")
                                    and isinstance(summary["generations_done"], int)):
        files.warn(files.run_dir / "summary.json", "not an AutoLR run summary", rebuild)
    elif summary is not None and summary["generations_done"] >= len(history):
        try:
            print_summary(summary, files.run_dir, console)
        except _MALFORMED as err:
            files.warn(files.run_dir / "summary.json", f"{type(err).__name__}: {err}", rebuild)
        else:
            _show_fame(files, summary.get("mode"), history, console,
                       summary.get("preset"))
            return True
    if config is None:
        return False
    events = files.events()
    ago = "" if not events else f", last activity {time.time() - events[-1]['time']:.0f} s ago"
    name, preset, seed, generations = (escape(str(v)) for v in (
        config.name, config.preset, config.seed, config.generations))
    console.print(f"AutoLR run [bold]{name}[/] ({config.mode.name}, preset {preset}, seed {seed}): "
                  f"{len(history)} of {generations} generations checkpointed{ago}; no summary "
                  f"yet (running or stopped: `{escape(files.resume)}` continues it)",
                  highlight=False)
    if not history:
        return True
    table = Table(title="generations", title_justify="left")
    for column in ("gen", "best", "median", "worst", "new"):
        table.add_column(column)
    for r in history:
        table.add_row(str(r.generation), tiered(config, r.best), tiered(config, r.median),
                      tiered(config, r.worst),
                      str(r.evaluated))
    console.print(table)
    counts = evaluation_counts(events)
    wall, sessions = wall_seconds(events)
    console.print(f"evaluations: {escape(_evaluations(counts))}; wall {wall:.0f} s over "
                  f"{sessions} session(s)", highlight=False)
    console.print(_fame_table(hall_of_fame(config.mode, history, preset=config.preset),
                              console.width))
    return True


def _show_fame(files: _Files, mode: object, history: list[GenerationRecord],
               console: Console, preset: str | None = None) -> None:
    """The hall of fame from its file, else recomputed from the checkpoint (noted)."""
    path = files.run_dir / "hall_of_fame.json"
    can_rebuild = bool(history) and modes.find(mode) is not None
    instead = (f"recomputed from the checkpoint ({files.resume} rewrites it)" if can_rebuild
               else "no checkpoint to recompute it from")
    fame = files.json(path.name, instead)
    if fame is not None:
        try:
            console.print(_fame_table(fame, console.width))
            return
        except _MALFORMED as err:
            files.warn(path, f"{type(err).__name__}: {err}", instead)
    elif not path.is_file():
        return
    if can_rebuild:
        console.print(_fame_table(hall_of_fame(mode, history, preset=preset), console.width))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.show",
                                     description="Print the summary and hall of fame of an "
                                                 "AutoLR run (finished or still running).")
    parser.add_argument("run_dir", type=Path, help="the run directory (engine.run --out)")
    args = parser.parse_args(argv)
    return show(args.run_dir)
