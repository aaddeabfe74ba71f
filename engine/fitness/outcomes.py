"""How a candidate was answered: the one vocabulary of the live display, summary.json,
report.md, `engine.show` and TensorBoard.

Every answer falls in exactly one kind, so the counts of a generation add up to its answers and
the per-generation counts add up to the run's. A failure is counted by what went wrong, however
it was learnt: a program that diverged in an earlier run and is answered from the store counts
as ``diverged``, not ``store`` (``store`` and ``twin`` are fitnesses measured before). Each
answer's raw ``source`` and ``reason`` stay in events.jsonl and history.csv.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["KINDS", "NAMES", "Kind", "count", "describe", "detail", "kind_of", "zero"]


@dataclass(frozen=True)
class Kind:
    name: str     # the word shown everywhere and the key in summary.json
    meaning: str  # one line for report.md and the README


KINDS: tuple[Kind, ...] = (
    Kind("trained", "trained now; fitness measured"),
    Kind("store", "fitness measured before, answered from the results store"),
    Kind("micro", "ranked on the micro tier only: not among the best to go on to training"),
    Kind("twin", "behaves as a program already measured (same fingerprint on probe inputs)"),
    Kind("screened", "rejected without training: broken on probe inputs"),
    Kind("diverged", "training diverged (non-finite loss, or a schedule's non-finite lr)"),
    Kind("timeout", "training ran past the time limit"),
    Kind("error", "an error that is not the program's own (an exception, a dead worker)"),
    Kind("unparseable", "the text is not a program"),
)
NAMES: tuple[str, ...] = tuple(k.name for k in KINDS)

# A failure's reason starts with what went wrong (engine.fitness.evaluator, engine.tasks.training, executors).
_BY_PREFIX = (("screened", "screened"), ("diverged", "diverged"), ("timeout", "timeout"),
              ("parse error", "unparseable"))
_SUCCESS = {"trained": "trained", "store": "store", "fingerprint": "twin", "micro": "micro"}


def kind_of(source: str, reason: str | None) -> str:
    """The kind of one answer, from engine.fitness.evaluator's Evaluation.source and .reason."""
    if reason:
        for prefix, kind in _BY_PREFIX:
            if reason.startswith(prefix):
                return kind
        return "error"
    if source == "failed":  # defensive: an unparseable answer always carries its reason
        return "unparseable"
    if source == "screened":
        return "screened"
    return _SUCCESS.get(source, "error")


def zero() -> dict[str, int]:
    return dict.fromkeys(NAMES, 0)


def count(answers: Iterable[Mapping]) -> dict[str, int]:
    """Answers (events or anything with 'source' and 'reason') per kind, every kind present,
    in the table's order."""
    counts = Counter(kind_of(a["source"], a.get("reason")) for a in answers)
    return {name: counts[name] for name in NAMES}


def detail(reason: str) -> str:
    """A failure reason without its particulars, for the breakdown within a kind:
    'screened: NaN or inf weight update', 'diverged', 'raised', 'worker died'..."""
    head, _, rest = reason.partition(":")
    if head == "screened":
        return "screened: " + re.split(r" (?:at step|on probe)", rest.strip())[0]
    # "worker died (exit code 3)"; the executor's "timeout after 30.0 s" is a timeout too.
    return re.sub(r"\s*(\(.*| after .*)", "", head).strip()


def describe(counts: Mapping[str, int], *, sep: str = " · ") -> str:
    """'trained 5 · screened 1 · diverged 1': every kind that happened, in the table's order,
    the same words wherever counts are shown."""
    shown = [f"{name} {counts.get(name, 0)}" for name in NAMES if counts.get(name, 0)]
    return sep.join(shown) or "none yet"
