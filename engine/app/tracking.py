"""`engine.run --tensorboard DIR`: the run's progress as TensorBoard scalars and text.

Per generation (the step is the generation number): ``fitness/best``, ``fitness/median``,
``fitness/worst``, ``fitness/best_so_far``, ``outcomes/<kind>`` (this generation's answers per
engine.fitness.outcomes kind, every kind, zeros included, so the curves line up), ``time/generation_s``
and ``time/elapsed_s``; and the best program so far as text (``best_program``). history.csv and
events.jsonl stay the record of the run; this is a view of it for people who already watch
their trainings in TensorBoard.

TensorBoard is optional (``pip install 'autolr[tensorboard]'``): `check_available` says so in one
line before the run starts, never after an hour of evolution.
"""

from __future__ import annotations

import time
from pathlib import Path

from engine.fitness import outcomes

__all__ = ["TensorBoardLog", "TrackingUnavailable", "check_available"]


class TrackingUnavailable(RuntimeError):
    """--tensorboard was asked for and the tensorboard package is not installed."""


def check_available() -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as err:  # torch raises ImportError naming tensorboard when it is missing
        raise TrackingUnavailable(
            f"--tensorboard needs the tensorboard package ({err}); install it with "
            "`pip install tensorboard` (or the project's extra: pip install -e '.[tensorboard]'), "
            "or drop --tensorboard") from None


class TensorBoardLog:
    """One run's TensorBoard event file in ``directory`` (created if missing)."""

    def __init__(self, directory: str | Path, history: list | None = None) -> None:
        """`history`: the GenerationRecords a resumed run already has, so that best_so_far
        goes on from them."""
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(directory))
        self.started = time.time()
        self.counts = outcomes.zero()
        self.best: tuple[float, str] | None = None
        for record in history or ():
            if self.best is None or record.best > self.best[0]:
                self.best = (record.best, record.best_phenotype)

    def start_generation(self) -> None:
        self.counts = outcomes.zero()

    def answered(self, evaluation) -> None:
        self.counts[outcomes.kind_of(evaluation.source, evaluation.reason)] += 1

    def generation_done(self, record, seconds: float) -> None:
        """`record`: an engine.evolution.evolve.GenerationRecord; `seconds`: the generation's wall time."""
        step, add = record.generation, self.writer.add_scalar
        add("fitness/best", record.best, step)
        add("fitness/median", record.median, step)
        add("fitness/worst", record.worst, step)
        if self.best is None or record.best > self.best[0]:
            self.best = (record.best, record.best_phenotype)
        add("fitness/best_so_far", self.best[0], step)
        for kind, n in self.counts.items():
            add(f"outcomes/{kind}", n, step)
        add("time/generation_s", seconds, step)
        add("time/elapsed_s", time.time() - self.started, step)
        # Markdown: indented lines render as code, one state per line.
        text = "\n".join("    " + line for line in self.best[1].splitlines())
        self.writer.add_text("best_program", f"fitness {self.best[0]:.4f}\n\n{text}", step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
