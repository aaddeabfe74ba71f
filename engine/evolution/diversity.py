"""Keeping a search moving: re-mutating children that repeat a parent, capping structural niches,
and restarting a stagnant run from its hall of fame (EvolutionConfig's remutate, niche_cap and
restart_after; engine/evolution/evolve.py calls these).

Why: a search whose children mostly repeat their parents, or whose population collapses onto one
seed's constant-tweaked descendants, spends its evaluations re-measuring one optimizer (the
RESULTS.md runs: the best of a 40 x 30 run was the RMSprop seed with a larger step). The Lion
search re-mutated duplicates before evaluating them; niches by structure keep other shapes alive;
restarts bring fresh structure once the best stops improving.

Every function takes its randomness from the generation's ``random.Random``, and the stagnation
test and the hall of fame read only the run's history, so a resumed run replays these decisions
bit for bit.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Sequence

from engine.evolution.grammar import Grammar
from engine.evolution.sge import Individual, individual_from_text, map_genotype, mutate

__all__ = ["forced_change", "hall_of_fame", "mutation_with", "remutated", "stagnant"]

Key = Callable[[str], Hashable]


def remutated(grammar: Grammar, base: Individual, child: Individual, taken: set[Hashable],
              key: Key, attempts: int, mutation: Callable[[Individual], Individual],
              max_depth: int, rng: random.Random) -> Individual:
    """``child`` if its key is not in ``taken`` (its parents' keys); else ``base`` (the child
    before mutation) mutated again, up to ``attempts`` times, then ``forced_change`` as a last
    resort. The result repeats a parent only when no single-codon change of ``base`` avoids it."""
    tries = 0
    while key(child.phenotype) in taken and tries < attempts:
        child = mutation(base)
        tries += 1
    if key(child.phenotype) in taken:
        child = forced_change(grammar, base, taken, key, max_depth, rng) or child
    return child


def forced_change(grammar: Grammar, base: Individual, taken: set[Hashable], key: Key,
                  max_depth: int, rng: random.Random) -> Individual | None:
    """The first, in a random order, of ``base``'s single-codon changes whose key is not taken;
    None when there is none. Every used codon is tried with every other production that fits at
    its depth (a free constant: halved and doubled), so the search is exhaustive but finite."""
    moves: list[tuple[int, int, int | float]] = []
    for nt, depths in enumerate(base.codon_depths):
        codons = base.genotype[nt]
        for i, depth in enumerate(depths):
            if grammar.free[nt]:
                moves += [(nt, i, codons[i] * 0.5), (nt, i, codons[i] * 2.0 or 1.0)]
            else:
                moves += [(nt, i, k) for k in grammar.fitting(nt, max_depth - depth)
                          if k != codons[i]]
    rng.shuffle(moves)
    for nt, i, codon in moves:
        genes = [list(c) for c in base.genotype]
        genes[nt][i] = codon
        child = map_genotype(grammar, tuple(tuple(c) for c in genes), max_depth, rng)
        if key(child.phenotype) not in taken:
            return child
    return None


def stagnant(best_per_generation: Sequence[float], after: int) -> bool:
    """Whether the next generation restarts: the best has not improved for a positive multiple of
    ``after`` generations (so a restart that does not help is followed by another ``after``
    generations later, not by one every generation)."""
    if after <= 0 or not best_per_generation:
        return False
    top, improved = best_per_generation[0], 0
    for generation, best in enumerate(best_per_generation):
        if best > top:
            top, improved = best, generation
    since = len(best_per_generation) - 1 - improved
    return since > 0 and since % after == 0


def hall_of_fame(grammar: Grammar, history: Sequence[tuple[Sequence[str], Sequence[float]]],
                 size: int, max_depth: int,
                 known: dict[str, Individual]) -> list[tuple[Individual, float]]:
    """The ``size`` best distinct phenotypes of the whole run, with their fitness, best first
    (earliest on ties). ``history`` is (phenotypes, fitness) per generation. An individual comes
    from ``known`` (text -> individual, e.g. the current population) or is derived again from
    its text; one that no longer derives (it cannot, for a phenotype the grammar produced) is
    skipped."""
    best: dict[str, tuple[float, int]] = {}
    order = 0
    for phenotypes, fitness in history:
        for text, value in zip(phenotypes, fitness):
            if text not in best or value > best[text][0]:
                best[text] = (value, best[text][1] if text in best else order)
            order += 1
    ranked = sorted(best, key=lambda t: (-best[t][0], best[t][1]))
    out: list[tuple[Individual, float]] = []
    for text in ranked:
        if len(out) == size:
            break
        individual = known.get(text)
        if individual is None:
            try:
                individual = individual_from_text(grammar, text, max_depth, "hall of fame")
            except ValueError:
                continue
        out.append((individual, best[text][0]))
    return out


def mutation_with(grammar: Grammar, p_mut: float, p_const: float | None, max_depth: int,
                  rng: random.Random) -> Callable[[Individual], Individual]:
    """The generation's mutation as a one-argument function (what ``remutated`` repeats)."""
    return lambda individual: mutate(grammar, individual, p_mut, max_depth, rng, p_const=p_const)
