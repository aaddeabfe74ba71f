"""What a fitness evaluation gives back: each trial's accuracy and curves, and the candidate's
fitness with how it got it (the presets' protocols and a SupervisedTask's alike)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine.tasks.epochs import FitResult

__all__ = ["EvalResult", "TrialResult"]


@dataclass(frozen=True)
class TrialResult:
    """One training run: its chunk (-1 for DLR's whole pool), fitness-set accuracy and curves."""

    chunk: int
    accuracy: float  # on the fitness set, with the best epoch's weights restored
    fit: FitResult


@dataclass(frozen=True)
class EvalResult:
    """A candidate's fitness and how it got it. `reason` is None unless it failed.

    On failure (divergence, timeout) fitness is FLOOR_FITNESS and the trials so far are kept.
    This is what an evaluation worker sends back (it pickles small: floats and short tuples);
    `compile_seconds` is the kernel compile that preceded training, 0 where nothing compiles.
    """

    fitness: float
    trials: tuple[TrialResult, ...]
    seconds: float
    reason: str | None = None
    compile_seconds: float = 0.0

    @property
    def accuracies(self) -> tuple[float, ...]:
        return tuple(t.accuracy for t in self.trials)

    @property
    def epochs(self) -> int:
        return sum(t.fit.epochs for t in self.trials)

    @property
    def train_loss(self) -> tuple[tuple[float, ...], ...]:
        return tuple(t.fit.train_loss for t in self.trials)

    @property
    def val_acc(self) -> tuple[tuple[float, ...], ...]:
        return tuple(t.fit.val_acc for t in self.trials)

    @property
    def curves(self) -> dict[str, tuple[tuple[float, ...], ...]]:
        """Per-trial training loss and validation accuracy, as a run's curves files hold them."""
        return {"train_loss": self.train_loss, "val_acc": self.val_acc}

    def to_dict(self) -> dict[str, object]:
        """JSON-ready, for the store and reports."""
        return {
            "fitness": self.fitness,
            "reason": self.reason,
            "seconds": self.seconds,
            "compile_seconds": self.compile_seconds,
            "accuracies": list(self.accuracies),
            "epochs": self.epochs,
            "trials": [
                {"chunk": t.chunk, "accuracy": t.accuracy, **dataclasses.asdict(t.fit)}
                for t in self.trials
            ],
        }
