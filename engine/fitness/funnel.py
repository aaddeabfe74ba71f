"""A run's fitness through the fidelity-tier funnel (engine.fitness.tiers) instead of one
training per candidate.

The cheap answers stay the evaluator's: a text that does not parse or that screening rejects
gets the floor fitness and never enters the funnel. Every other text of a generation is scored
on the micro tier (stacked trainings with the IR interpreter, split between the executor's
workers), and only the best fraction reaches the quick tier, which is the evaluator's own
training of one candidate (so its answers come from, and go to, the results store as before:
a candidate trained once is never trained again, in this run or another). Higher tiers are the
same training at more seeds.

Resume: the funnel's rows are saved in the run directory after every scorer call
(`STATE_FILE`); a resumed run loads them, the interrupted generation is re-run by evolve, and
every job with a row is answered from it, so the result is the uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from engine.fitness.evaluator import Evaluation, Evaluator
from engine.fitness.store import not_reusable
from engine.fitness.tiers import DEFAULT_TIERS, Funnel, FunnelState, Job, Tier
from engine.rundir import write_atomic

__all__ = ["STATE_FILE", "FunnelFitness", "default_tiers", "score_chunk"]

STATE_FILE = "funnel.json"


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
                 tick: Callable[[], None] | None = None) -> None:
        if len(tiers) < 2:
            raise ValueError("a funnel run needs at least two tiers (the micro tier and the "
                             "preset's training)")
        for tier in tiers[1:]:
            if tuple(tier.lr_scales) != (1.0,):
                raise ValueError(f"tier {tier.name!r}: a trained tier runs the program at its "
                                 f"own step size; use lr_scales [1.0], not {list(tier.lr_scales)}")
        self.evaluator, self.tiers, self.path, self.tick = evaluator, list(tiers), state_path, tick
        state = None
        if state_path.exists():
            state = FunnelState.from_json(json.loads(state_path.read_text(encoding="utf-8")))
        scorers = {tiers[0].name: self._micro, **{t.name: self._train for t in tiers[1:]}}
        self.funnel = Funnel(tiers, scorers, state, checkpoint=self._save)
        self.trained: dict[str, Evaluation] = {}  # text -> its seed-0 training's answer
        self._by_seed: dict[int, Evaluator] = {0: evaluator}
        # Rows of trainings that failed by no fault of the candidate's (a timeout, a dead
        # worker): used for this generation, as the evaluator uses its floor fitness, but never
        # saved, so that a resume (or the next time the text comes up) trains it again.
        self._unsaved: set[tuple[str, str, float, int]] = set()

    def _save(self, state: FunnelState) -> None:
        data = state.to_json()
        data["rows"] = [r for r in data["rows"] if tuple(r[:4]) not in self._unsaved]
        write_atomic(self.path, json.dumps(data))
        if self.tick is not None:
            self.tick()

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
        """The evaluator's training (store first) per seed offset; a failed training is 0."""
        out = [0.0] * len(jobs)
        for s in sorted({j[2] for j in jobs}):
            index = [i for i, j in enumerate(jobs) if j[2] == s]
            answers = self._evaluator(s).evaluate([jobs[i][0] for i in index])
            for i, answer in zip(index, answers):
                out[i] = answer.fitness if answer.reason is None else 0.0
                if not_reusable(answer.reason):
                    self._unsaved.add((jobs[i][0], tier.name, float(jobs[i][1]), s))
                if s == 0:
                    self.trained[jobs[i][0]] = answer
        return out

    def _evaluator(self, offset: int) -> Evaluator:
        """The run's evaluator at seed run_seed + offset (same store, executor and task)."""
        if offset not in self._by_seed:
            other = copy.copy(self.evaluator)
            other.seed = self.evaluator.seed + offset
            self._by_seed[offset] = other
        return self._by_seed[offset]

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
        candidates = [t for i, t in enumerate(texts) if i not in final]
        standings = dict(zip(candidates, self.funnel.evaluate(candidates)))
        for key in self._unsaved:
            self.funnel.state.rows.pop(key, None)
        self._unsaved.clear()
        results = []
        for i, text in enumerate(texts):
            if i in final:
                results.append(final[i])
                continue
            standing = standings[text]
            if standing.level == 0:
                answer = Evaluation(text, hashes.get(i), standing.fitness, "micro")
            else:
                seen = self.trained.get(text) or Evaluation(text, hashes.get(i), 0.0, "store")
                answer = dataclasses.replace(seen, text=text, fitness=standing.fitness)
            if on_result is not None:
                on_result(answer)
            results.append(answer)
        return results

    def counts(self) -> list[dict]:
        """The last generation's per-tier figures (the progress display's)."""
        return self.funnel.state.counts[-1] if self.funnel.state.counts else []
