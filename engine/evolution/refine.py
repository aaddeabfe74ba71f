"""Constant refinement: a short local search on the free constants of the candidates a funnel
promoted past its first tier (EvolutionConfig.refine_constants; engine/evolution/evolve.py calls
``refine`` after every generation's evaluation).

Why: mutation moves a constant by one Gaussian step per child, and a child competes with the
whole population, so a good structure with poor constants is often lost before its constants
are tuned; the original system's later work found that most of what a search improves is
constants. Spending a few evaluations on the constants of a structure that already proved itself
(promoted past the cheap micro tier) separates "is this rule good" from "are its constants
good", and doing it once per structure (the set of refined ``structure_key``s, which evolve
checkpoints) keeps the cost bounded however long the structure survives.

The search is a (1+lambda) evolution strategy: each step makes ``VARIANTS`` copies of the
current program, each moving every used free constant by ``exp(N(0, sigma))`` (sign kept), and
keeps the best copy if it beats the current one; sigma halves after a step without improvement.
Every candidate's variants of one step go to the fitness function in one batch, so a funnel
scores them on its micro tier and promotes the best as it does any batch, and a variant's
fitness is on the same scale as the original's. A variant that changes structure (a constant
that canonicalisation folds away, such as mul(1.0, x), moved off 1.0) is dropped unscored: it
would be a structural change, not a refinement.

Randomness comes from a ``random.Random`` of its own per generation, so the generation's
breeding draws the same numbers with the option on or off.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from engine.evolution.grammar import Grammar
from engine.evolution.sge import FREE_CONSTANT_STEP, Individual, map_genotype
from engine.evolution.structure import structure_key

__all__ = ["SIGMA", "STEPS", "VARIANTS", "check_refinable", "promoted", "refinable", "refine",
           "vary_constants"]

VARIANTS = 6  # lambda: one micro-tier batch of six is a quarter of a generation of the presets
STEPS = 3
SIGMA = FREE_CONSTANT_STEP  # the first step is as wide as a mutation's; later ones narrow

Evaluate = Callable[[list[str]], list[float]]


def check_refinable(grammar: Grammar) -> None:
    """A ValueError unless ``grammar`` has free constants: a table's constants (the paper
    grammar's) are codons that mutation already walks, and there is nothing else to move."""
    if not grammar.has_free_constants:
        raise ValueError(f"refine_constants needs a grammar with free constants (a rule "
                         f"'<x> ::= %float'); {grammar.source} has none")


def promoted(fitness: float) -> bool:
    """Whether a funnel fitness is past the first tier. The funnel's fitness is 2 * tier level
    + a score in [0, 1] (engine.fitness.tiers, ``split_fitness``), so level >= 1 is fitness >= 2;
    read here from the number alone because the evolution layer does not import fitness. A
    fitness without tiers lies in [0, 1]: level 0, never promoted."""
    return fitness >= 2.0


def refinable(grammar: Grammar, individual: Individual) -> bool:
    """Whether ``individual`` uses at least one free constant (an unused codon is not its own)."""
    return any(grammar.free[nt] and depths for nt, depths in enumerate(individual.codon_depths))


def vary_constants(grammar: Grammar, individual: Individual, sigma: float,
                   rng: random.Random, max_depth: int) -> Individual:
    """``individual`` with every used free constant times ``exp(N(0, sigma))``: the sign is
    kept, a 0 stays 0 (no scale moves it), and structure codons are untouched, so re-mapping
    needs no randomness."""
    genes = [list(codons) for codons in individual.genotype]
    for nt, depths in enumerate(individual.codon_depths):
        if not grammar.free[nt]:
            continue
        for i in range(len(depths)):
            stepped = genes[nt][i] * math.exp(rng.gauss(0.0, sigma))
            if math.isfinite(stepped) and stepped != 0.0:
                genes[nt][i] = stepped
    return map_genotype(grammar, tuple(tuple(c) for c in genes), max_depth)


def _chosen(grammar: Grammar, population: Sequence[tuple[Individual, float]], count: int,
            refined: set[str]) -> list[int]:
    """Indices of the ``count`` best promoted members with free constants, one per structure,
    skipping structures refined before (best first, earliest on ties)."""
    ranked = sorted(range(len(population)), key=lambda i: (-population[i][1], i))
    chosen: list[int] = []
    seen: set[str] = set()
    for i in ranked:
        if len(chosen) == count:
            break
        individual, fitness = population[i]
        if not promoted(fitness):
            break  # ranked best first: nobody after this one is promoted either
        key = structure_key(individual.phenotype)
        if key in refined or key in seen or not refinable(grammar, individual):
            continue
        seen.add(key)
        chosen.append(i)
    return chosen


def refine(grammar: Grammar, population: Sequence[tuple[Individual, float]], count: int,
           refined: set[str], evaluate: Evaluate, rng: random.Random,
           max_depth: int) -> tuple[dict[int, tuple[Individual, float]], int]:
    """Refine the constants of up to ``count`` members of ``population`` ((individual, fitness)
    pairs) and return ({index: (refined individual, fitness)} for those a variant improved,
    number of texts sent to ``evaluate``). The structures chosen are added to ``refined``
    whether or not they improved: a structure is refined at most once per run."""
    chosen = _chosen(grammar, population, count, refined)
    refined.update(structure_key(population[i][0].phenotype) for i in chosen)
    current = {i: population[i] for i in chosen}
    sigma = {i: SIGMA for i in chosen}
    sent = 0
    for _ in range(STEPS):
        variants: dict[int, list[Individual]] = {}
        for i in chosen:
            parent = current[i][0]
            shape = structure_key(parent.phenotype)
            made = (vary_constants(grammar, parent, sigma[i], rng, max_depth)
                    for _ in range(VARIANTS))
            variants[i] = [v for v in made if structure_key(v.phenotype) == shape]
        texts = [v.phenotype for i in chosen for v in variants[i]]
        if not texts:
            break
        values = iter(evaluate(texts))
        sent += len(set(texts))
        for i in chosen:
            scored = [(v, next(values)) for v in variants[i]]
            best = max(range(len(scored)), key=lambda k: (scored[k][1], -k), default=None)
            if best is not None and scored[best][1] > current[i][1]:
                current[i] = scored[best]
            else:
                sigma[i] /= 2.0
    return {i: current[i] for i in chosen if current[i] is not population[i]}, sent
