"""A run's fitness through the fidelity-tier funnel (engine.fitness.tiers) instead of one
training per candidate.

The cheap answers stay the evaluator's: a text that does not parse or that screening rejects
gets the floor fitness and never enters the funnel. Every other text of a generation is scored
on the micro tier (stacked trainings with the IR interpreter, split between the executor's
workers), and only the best fraction reaches the quick tier, which is the evaluator's own
training of one candidate (so its answers come from, and go to, the results store as before:
a candidate trained once is never trained again, in this run or another). Higher tiers are the
same training at more seeds.

A trained tier's tasks are task names: a preset's (`quick`), a built-in family's or a user's
reference (engine.tasks.registry); each job (program, lr scale, seed) trains on every one of
them, at that scale (engine.modes: Mode.train's `lr_scale`). Its row is the task's score when
the tier has one task and does not normalise, the mean over tasks when it does not normalise,
and otherwise the minimum over tasks of `relative(score, baseline)`, where the baseline is the
mode's own (Adam for ALR) trained on the same task and seed at every scale of the tier and taken
at its best: Adam tuned over the same grid. `relative` compares errors (1 - score, so that an
accuracy and the regression's exp(-loss) read alike): 1 / (1 + err / err_baseline), 0.5 where
the candidate matches the baseline, towards 1 as its error falls to 0, towards 0 as it fails.
The minimum keeps one failed task from being hidden by good ones, as the paper's protocol takes
the minimum over trials. Each task's own score is kept as a row of its own (tier "NAME/TASK"),
which `best_detail` reads back for summary.json's `best.tasks`.

Resume: the funnel's rows are saved in the run directory after every scorer call
(`STATE_FILE`, append-only: each save adds one line with the rows, texts and counts that are new
since the last, so a save costs what it adds, not the whole run's rows again: a 75-minute
campaign's state had grown to 25 MB, rewritten a dozen times a generation); a resumed run loads
them (`read_state`), the interrupted generation is re-run by evolve, and
every job with a row is answered from it, so the result is the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from engine.fitness.evaluator import Evaluation, Evaluator, train_batches
from engine.fitness.store import not_reusable
from engine.fitness.tiers import DEFAULT_TIERS, Funnel, FunnelState, Job, Tier
from engine.rundir import end_line

__all__ = ["STATE_FILE", "FunnelFitness", "read_state", "aggregate", "default_tiers", "micro_tiers", "relative",
           "score_chunk", "task_definition"]

STATE_FILE = "funnel.jsonl"
OLD_STATE_FILE = "funnel.json"  # a whole-state snapshot, as runs before the append-only log saved


def _final(answer: Evaluation) -> bool:
    """An answer that never enters the funnel: unparseable or screened. Both are functions of
    the text alone, however they were learnt (screening now, or the store): which texts enter
    must not depend on the store, or a resumed run would rank a different set."""
    return answer.source == "failed" or (answer.reason or "").startswith("screened")


def default_tiers(preset: str) -> list[dict]:
    """A preset's tiers as config.json holds them: the measured micro tier, then the preset's
    own training (one seed), then, past smoke, that training at several raced seeds."""
    micro, quick, top = DEFAULT_TIERS
    tiers = [micro, dataclasses.replace(quick, tasks=(preset,))]
    if preset != "smoke":
        tiers.append(dataclasses.replace(top, tasks=(preset,)))
    return [t.to_json() for t in tiers]


def read_state(path: Path) -> FunnelState | None:
    """The funnel state a run saved in `path` (None: nothing saved yet). Each line adds rows,
    texts in first-seen order and per-call counts; a line a kill cut short is skipped (its rows
    are scored again, as they would have been had the kill come before the save). A run saved
    before the append-only log (`OLD_STATE_FILE` beside it) is read from that snapshot."""
    old = path.with_name(OLD_STATE_FILE)
    if not path.exists():
        if old.exists():
            return FunnelState.from_json(json.loads(old.read_text(encoding="utf-8")))
        return None
    state = FunnelState()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            part = json.loads(line)
        except ValueError:
            continue
        for t, tier, scale, seed, v in part.get("rows", ()):
            state.rows[(t, tier, float(scale), int(seed))] = float(v)
        for t in part.get("order", ()):
            state.order.setdefault(t, len(state.order))
        state.counts.extend(part.get("counts", ()))
    return state


def micro_tiers(mode, tiers: Sequence[Tier]) -> set[str]:
    """The names of `tiers`' micro tiers (those with a step count, Tier.steps: stacked
    trainings of MICRO_TASKS); a ValueError for tiers a run cannot have."""
    from engine.fitness.micro import MICRO_TASKS

    if not tiers:
        raise ValueError("a funnel run needs at least one tier")
    micro = {t.name for t in tiers if t.steps is not None}
    for tier in tiers:
        unknown = [t for t in tier.tasks if t not in MICRO_TASKS]
        if tier.name in micro and unknown:
            raise ValueError(f"tier {tier.name!r} has steps, so it is a micro tier, but "
                             f"{', '.join(unknown)} are not micro tasks (choose from "
                             f"{', '.join(MICRO_TASKS)}); drop steps to train tasks")
        if tier.name in micro and not mode.tiered:
            raise ValueError(f"tier {tier.name!r}: {mode.title} has no micro tier (the IR "
                             "interpreter runs ALR programs); start with a trained tier (no "
                             "steps)")
    return micro


def task_definition(name: str, device: str | None = None):
    """What an Evaluator trains for a trained tier's task `name`: a preset's Task, or the
    checked TaskRef of a family or a user's reference (a TaskError, a ValueError, if it does
    not resolve or fails the task check)."""
    from engine.tasks.families.fmnist_cnn import SIZES
    from engine.tasks.protocol import get_task

    if name in SIZES:
        return get_task(name, device)
    from engine.tasks.registry import resolve
    from engine.tasks.supervised import check_task

    task, ref = resolve(name, device or "cpu")
    check_task(task, ref.device)
    return ref


def relative(score: float, baseline: float, eps: float = 1e-3) -> float:
    """A task's score relative to the baseline's, in (0, 1): 1 / (1 + err / err_baseline) with
    err = 1 - score (`eps` keeps two perfect scores at 0.5 rather than 0 / 0)."""
    ratio = (1.0 - score + eps) / (1.0 - baseline + eps)
    return 1.0 / (1.0 + ratio)


def aggregate(scores: Sequence[float], baselines: Sequence[float]) -> float:
    """A normalised tier's score of one job over its tasks: the minimum of `relative`, so a
    task the candidate fails is never made up for by the others."""
    if len(scores) != len(baselines) or not scores:
        raise ValueError(f"one baseline per task: {len(scores)} scores, {len(baselines)} "
                         "baselines")
    return min(relative(a, b) for a, b in zip(scores, baselines))


def score_chunk(job: tuple[tuple[str, ...], int, list[tuple[str, float]], int]) -> list[float]:
    """Worker entry point: the micro scores of one share of a generation's jobs."""
    from engine.fitness.micro import score_micro

    tasks, steps, pairs, seed = job
    return score_micro(tasks, steps, pairs, seed=seed)


class FunnelFitness:
    """`evaluate(texts, on_result)` as Evaluator.evaluate, the fitness being the funnel's
    Standing.fitness (2 * tier level + the score there). `tick` is called after every scorer
    call (the run's time budget raises from it)."""

    def __init__(self, evaluator: Evaluator, tiers: Sequence[Tier], state_path: Path, *,
                 tick: Callable[[], None] | None = None, device: str | None = None) -> None:
        self.micro = micro_tiers(evaluator.mode, tiers)
        self.evaluator, self.tiers, self.path, self.tick = evaluator, list(tiers), state_path, tick
        self.device = device
        self.definitions = {name: self._definition(name) for tier in tiers
                            if tier.name not in self.micro for name in tier.tasks}
        state = read_state(state_path)
        end_line(state_path)  # a kill may have cut the last save short
        # What the file holds already: a save appends only what is new.
        self._written = set(state.rows) if state and state_path.exists() else set()
        self._n_order = len(state.order) if state and state_path.exists() else 0
        self._n_counts = len(state.counts) if state and state_path.exists() else 0
        scorers = {t.name: self._micro if t.name in self.micro else self._train for t in tiers}
        self.funnel = Funnel(tiers, scorers, state, checkpoint=self._save)
        self.trained: dict[str, Evaluation] = {}  # text -> its first training's answer
        self._evaluators: dict[tuple[str, float, int], Evaluator] = {}
        # Trainings this process ran for the trained tiers (every task, scale and seed): the
        # answers a run logs are one per candidate, so they alone would undercount the work.
        self.trainings, self.train_seconds = 0, 0.0
        self._told: set[str] = set()  # keys whose answer was already given as "trained"
        # Rows of trainings that failed by no fault of the candidate's (a timeout, a dead
        # worker): used for this generation, as the evaluator uses its floor fitness, but never
        # saved, so that a resume (or the next time the text comes up) trains it again.
        self._unsaved: set[tuple[str, str, float, int]] = set()

    def _definition(self, name: str):
        """What an Evaluator trains for task `name`: the run's own task, or `task_definition`'s."""
        if name in (self.evaluator.task, getattr(self.evaluator.definition, "ref", None)):
            return self.evaluator.definition
        return task_definition(name, self.device)

    def _save(self, state: FunnelState) -> None:
        self._write(state)
        if self.tick is not None:
            self.tick()

    def _write(self, state: FunnelState) -> None:
        """Append what is new since the last save (rows of a machine's failure never)."""
        rows = [[*key, v] for key, v in state.rows.items()
                if key not in self._written and key not in self._unsaved]
        order = list(state.order)[self._n_order:]
        counts = state.counts[self._n_counts:]
        if not (rows or order or counts):
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"rows": rows, "order": order, "counts": counts}) + "\n")
        self._written.update(tuple(r[:4]) for r in rows)
        self._n_order, self._n_counts = len(state.order), len(state.counts)

    # -- scorers -------------------------------------------------------------------------------

    def _micro(self, tier: Tier, jobs: Sequence[Job]) -> list[float]:
        """Every job's micro score; each training seed's jobs split between the workers (a
        candidate's lr scales stay together)."""
        out = [0.0] * len(jobs)
        executor, seed = self.evaluator.executor, self.evaluator.seed
        parts = max(1, executor.workers)
        for s in sorted({j[2] for j in jobs}):
            index = [i for i, j in enumerate(jobs) if j[2] == s]
            texts = list(dict.fromkeys(jobs[i][0] for i in index))
            shares = [set(texts[k::parts]) for k in range(parts)]
            chunks = [[i for i in index if jobs[i][0] in share] for share in shares]
            chunks = [c for c in chunks if c]
            work = [(tier.tasks, tier.steps or DEFAULT_TIERS[0].steps,
                     [(jobs[i][0], jobs[i][1]) for i in c], seed + s) for c in chunks]
            for k, outcome in executor.run(score_chunk, work):
                # A worker's failure is the machine's, not the candidates': score here instead.
                values = outcome.value if outcome.ok else score_chunk(work[k])
                for i, v in zip(chunks[k], values):
                    out[i] = v
        return out

    def _train(self, tier: Tier, jobs: Sequence[Job]) -> list[float]:
        """Each job's row (module docstring): its raw score per task, then the aggregate."""
        ref = self.key(self.evaluator.mode.baseline()[1]) if tier.normalise else None
        grid = self.funnel.reference_scales(tier)
        seeds = sorted({j[2] for j in jobs})
        want = [(t, float(sc), s) for t, sc, s in jobs]
        if ref is not None:
            want += [(ref, float(sc), s) for sc in grid for s in seeds]
        raw = self._raw(tier, want)
        out = []
        for text, scale, seed in jobs:
            scores = [raw[(text, task, float(scale), seed)] for task in tier.tasks]
            if ref is None:
                out.append(sum(scores) / len(scores))
                continue
            base = [max(raw[(ref, task, float(sc), seed)] for sc in grid)
                    for task in tier.tasks]
            out.append(aggregate(scores, base))
        return out

    def _raw(self, tier: Tier, jobs: Sequence[Job]) -> dict[tuple[str, str, float, int], float]:
        """(text, task, scale, seed) -> the task's score (0 for a failed training), for every
        task of `tier`: from the tier's per-task rows, else trained (store first), all of one
        call's trainings in one executor call."""
        out, work = {}, []
        for task in tier.tasks:
            sub = f"{tier.name}/{task}"
            groups: dict[tuple[float, int], list[str]] = {}
            for text, scale, seed in dict.fromkeys(jobs):
                row = self.funnel.state.rows.get((text, sub, scale, seed))
                if row is None:
                    groups.setdefault((scale, seed), []).append(text)
                else:
                    out[(text, task, scale, seed)] = row
            for (scale, seed), texts in groups.items():
                evaluator = self._evaluator(task, scale, seed)
                work.append((task, scale, seed, evaluator, evaluator.answer_cheaply(texts)))
        train_batches(self.evaluator.executor, [(e, b) for *_, e, b in work])
        for task, scale, seed, _, batch in work:
            for answer in batch.results():
                if answer.source == "trained":
                    self.trainings += 1
                    self.train_seconds += answer.seconds
                value = answer.fitness if answer.reason is None else 0.0
                key = (answer.text, f"{tier.name}/{task}", scale, seed)
                self.funnel.state.rows[key] = value
                out[(answer.text, task, scale, seed)] = value
                if not_reusable(answer.reason):
                    self._unsaved.update({key, (answer.text, tier.name, scale, seed)})
                if seed == 0 and answer.text not in self.trained:
                    self.trained[answer.text] = answer
        return out

    def _evaluator(self, task: str, scale: float, offset: int) -> Evaluator:
        """The run's evaluator for `task` at step size scale `scale` and seed run_seed +
        offset (same store, executor, backend and limits)."""
        key = (task, scale, offset)
        e = self.evaluator
        if self.definitions[task] is e.definition and (scale, offset) == (1.0, 0):
            return e
        if key not in self._evaluators:
            other = Evaluator(e.mode, self.definitions[task], e.seed + offset, e.store,
                              e.executor, time_limit=e.time_limit, backend=e.backend, run=e.run,
                              worker=e.worker, lr_scale=scale)
            other.counts, other.failures = e.counts, e.failures  # one run, one set of counts
            self._evaluators[key] = other
        return self._evaluators[key]

    def lr_scale(self, text: str) -> float:
        """The step size scale `text` scored best at, at the highest tier it reached."""
        text = self.key(text)
        tier = self._reached(text)
        return 1.0 if tier is None else self.funnel.best_scale(tier, text)

    def _reached(self, text: str) -> Tier | None:
        return next((t for t in reversed(self.tiers)
                     if self.funnel.tier_score(t, text) is not None), None)

    def best_detail(self, text: str) -> dict:
        """summary.json's `best.lr_scale` and `best.tasks` for `text`: at the highest tier it
        reached and its best scale, per task its mean score over the seeds it ran, the
        baseline's at the baseline's own best scale over the same seeds (trained now if the
        tier did not normalise), and the relative score of the two."""
        text = self.key(text)
        tier = self._reached(text)
        if tier is None or tier.name in self.micro:
            return {"lr_scale": self.lr_scale(text), "tier": tier and tier.name,
                    "tasks": [{"task": t, "score": None, "baseline": None, "relative": None}
                              for t in (tier.tasks if tier else ())]}
        scale = self.funnel.best_scale(tier, text)
        seeds = range(len(self.funnel._seed_scores(tier, text, range(tier.seeds))))
        ref = self.key(self.evaluator.mode.baseline()[1])
        grid = self.funnel.reference_scales(tier)
        raw = self._raw(tier, [(t, float(sc), s) for t, scales in ((text, [scale]), (ref, grid))
                               for sc in scales for s in seeds])
        tasks = []
        for task in tier.tasks:
            mine = sum(raw[(text, task, scale, s)] for s in seeds) / len(seeds)
            base = max(sum(raw[(ref, task, float(sc), s)] for s in seeds) / len(seeds)
                       for sc in grid)
            tasks.append({"task": task, "score": round(mine, 6), "baseline": round(base, 6),
                          "relative": round(relative(mine, base), 6)})
        self._write(self.funnel.state)
        return {"lr_scale": scale, "tier": tier.name, "seeds": len(seeds), "tasks": tasks,
                "normalised": tier.normalise}

    # -- the fitness function ------------------------------------------------------------------

    def evaluate(self, texts: Sequence[str], on_result=None) -> list[Evaluation]:
        final: dict[int, Evaluation] = {}

        def cheap(evaluation: Evaluation) -> None:
            if _final(evaluation) and on_result is not None:
                on_result(evaluation)

        batch = self.evaluator.answer_cheaply(texts, cheap)
        for i, answer in batch.answers.items():
            if _final(answer):
                final[i] = answer
        hashes = {i: a.hash for i, a in batch.answers.items()}
        for h, pending in batch.pending.items():
            hashes.update({i: h for i in pending.indices})
        keys = {t: self.key(t) for i, t in enumerate(texts) if i not in final}
        distinct = list(dict.fromkeys(keys.values()))
        standings = dict(zip(distinct, self.funnel.evaluate(distinct)))
        for key in self._unsaved:
            self.funnel.state.rows.pop(key, None)
        self._unsaved.clear()
        results = []
        told = self._told
        for i, text in enumerate(texts):
            if i in final:
                results.append(final[i])
                continue
            standing = standings[keys[text]]
            if self.tiers[standing.level].name in self.micro:
                answer = Evaluation(text, hashes.get(i), standing.fitness, "micro")
            else:
                seen = self.trained.get(keys[text]) or Evaluation(text, hashes.get(i), 0.0,
                                                                  "store")
                # "trained" once, when its training ran: a candidate met again (a later
                # generation, another spelling) is answered from what is known, as the store's.
                source = "trained" if seen.source == "trained" and keys[text] not in told \
                    else "store" if seen.source == "trained" else seen.source
                told.add(keys[text])
                answer = dataclasses.replace(seen, text=text, fitness=standing.fitness,
                                             source=source)
            if on_result is not None:
                on_result(answer)
            results.append(answer)
        return results

    def key(self, text: str) -> str:
        """The funnel's key for a parseable `text`: its canonical program's text, so that two
        texts of one program (the same hash) are scored once, as the store answers them."""
        return str(self.evaluator.mode.parse(text).canonical())

    def counts(self) -> list[dict]:
        """The last generation's per-tier figures (the progress display's)."""
        return self.funnel.state.counts[-1] if self.funnel.state.counts else []
