"""Structured Grammatical Evolution: genotypes, their mapping to program text, and variation.

SGE (Lourenço et al.) keeps one codon list per non-terminal; codon ``c`` in the list of ``<nt>``
picks production ``c`` of ``<nt>`` (an index into its alternatives, duplicates included, so the
grammar's deliberate biases carry over). Mapping walks the derivation depth first, left to right,
taking the next unused codon of whichever non-terminal it expands. Locality is better than in
classic GE because a change in one list cannot shift the meaning of another's codons.

Design:
- Everything is immutable (tuples, frozen dataclasses) and every random draw takes an explicit
  ``random.Random``: the same seed gives the same individuals in any process, and a genotype can
  be shared without copying.
- Mapping is a function, not a method that edits the genotype: it returns a new Individual whose
  genotype is the one actually used, i.e. extended (dynamic SGE: a list that runs out gets a
  fresh random codon) and repaired (see below). Re-mapping that genotype needs no randomness and
  gives the same phenotype.
- Depth control (the repair rule). A node at depth ``d`` (the start symbol is at depth 1) may use
  production ``p`` only if ``d + p.shortest <= max_depth`` (``Production.shortest`` comes from
  the grammar's shortest-derivation table, so indirect recursion such as e -> fun -> e is bounded
  too). If the codon's production does not fit, the codon is replaced by ``fits[c % len(fits)]``,
  where ``fits`` lists the fitting productions in grammar order: deterministic, and the same codon
  always lands on the same repair. A fresh codon is drawn uniformly from ``fits``. Since the
  start symbol fits whenever ``max_depth >= grammar.shortest[start]``, every node has at least one
  fitting production and no tree is ever deeper than ``max_depth``.
- Free constants (a grammar rule ``<x> ::= %float``, engine/evolution/grammar.py): the codon list of
  such a rule holds the constants' values themselves, float32-rounded so that the phenotype's text
  reads back as the same value. A fresh one is drawn log-uniformly in [1e-4, 1] (the span of the
  paper's sigmoid table), positive: signs come from the grammar's ``neg`` and ``sub``. Mutation
  multiplies a value by ``exp(N(0, FREE_CONSTANT_STEP))``, a Gaussian step in log space that keeps
  the sign (0 cannot be scaled, so a 0 is redrawn instead).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from codegen.ir import Const, format_float
from engine.evolution.derivation import Derivation, derive
from engine.evolution.grammar import Grammar

__all__ = [
    "Genotype",
    "Individual",
    "crossover",
    "individual_from_text",
    "initialise",
    "map_genotype",
    "mutate",
    "mutate_genotype",
]

# One codon list per non-terminal, in grammar order; a free-constant rule's list holds floats.
Genotype = tuple[tuple[int | float, ...], ...]


@dataclass(frozen=True)
class Individual:
    """A mapped genotype: what variation needs (codons and where each was used) and the text.

    ``codon_depths[nt][i]`` is the depth of the node that consumed codon ``i`` of ``<nt>``; its
    length is the number of codons used, so codons past it are unused (kept, as SGE does, so that
    a later mutation can bring them back into play). ``size`` counts non-terminal nodes.
    """

    genotype: Genotype
    phenotype: str
    depth: int
    size: int
    codon_depths: tuple[tuple[int, ...], ...]


def map_genotype(grammar: Grammar, genotype: Genotype, max_depth: int,
                 rng: random.Random | None = None, *, grow_until: int = 0) -> Individual:
    """Map a genotype to its phenotype under ``max_depth``, extending and repairing codons.

    ``rng`` is needed only when a codon list runs out; without one that is an error, which lets
    callers re-map stored genotypes with the guarantee that nothing random happens. While a node
    is shallower than ``grow_until``, fresh codons prefer productions that can still reach that
    depth: that is how initialisation grows trees to a minimum depth (see ``initialise``).
    Over 60 lines because it is the inner loop of every mutation and initialisation: one loop
    over the derivation with its state in locals; helpers called per node would pass all of it
    (codons, counters, depths, output) back and forth and cost a call per tree node.
    """
    rules = grammar.rules
    if len(genotype) != len(rules):
        raise ValueError(f"genotype has {len(genotype)} codon lists but {grammar.source} has "
                         f"{len(rules)} non-terminals; it belongs to another grammar")
    if max_depth < grammar.shortest[grammar.start]:
        raise ValueError(f"max_depth={max_depth} is below the shallowest tree of "
                         f"{grammar.source} (depth {grammar.shortest[grammar.start]}); raise it")
    fitting = grammar.fitting
    free = grammar.free
    genes = [list(codons) for codons in genotype]
    used = [0] * len(rules)
    depths: list[list[int]] = [[] for _ in rules]
    out: list[str] = []
    stack: list[tuple[str | int, int]] = [(grammar.start, 1)]
    deepest = 0
    while stack:
        sym, depth = stack.pop()
        if isinstance(sym, str):
            out.append(sym)
            continue
        rule = rules[sym]
        codons = genes[sym]
        i = used[sym]
        used[sym] = i + 1
        depths[sym].append(depth)
        if depth > deepest:
            deepest = depth
        if free[sym]:
            out.append(format_float(_free_codon(grammar, sym, codons, i, rng)))
            continue
        fits = fitting(sym, max_depth - depth)
        if i < len(codons):
            choice = codons[i]
            if not 0 <= choice < len(rule):
                raise ValueError(f"codon {i} of <{grammar.names[sym]}> is {choice}, but it has "
                                 f"only {len(rule)} productions (valid codons: 0..{len(rule) - 1})")
            if rule[choice].shortest > max_depth - depth:
                choice = fits[choice % len(fits)]
                codons[i] = choice
        else:
            if rng is None:
                raise ValueError(f"the codon list of <{grammar.names[sym]}> ran out and no rng "
                                 "was given to extend it")
            if depth < grow_until:
                growing = [k for k in fits if depth + rule[k].height >= grow_until]
                choice = rng.choice(growing or fits)
            else:
                choice = rng.choice(fits)
            codons.append(choice)
        below = depth + 1
        stack.extend((s, below) for s in reversed(rule[choice].symbols))
    return Individual(genotype=tuple(tuple(c) for c in genes), phenotype="".join(out),
                      depth=deepest, size=sum(used),
                      codon_depths=tuple(tuple(d) for d in depths))


def _free_codon(grammar: Grammar, nt: int, codons: list, i: int,
                rng: random.Random | None) -> float:
    """The value of codon ``i`` of free-constant rule ``nt``, drawn (and appended) if missing."""
    if i < len(codons):
        value = codons[i]
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise ValueError(f"codon {i} of <{grammar.names[nt]}> is {value!r}, but a free "
                             "constant's codon must be a finite number")
        value = _float32(value)
        codons[i] = value
        return value
    if rng is None:
        raise ValueError(f"the codon list of <{grammar.names[nt]}> ran out and no rng was given "
                         "to extend it")
    value = _float32(10.0 ** rng.uniform(-4.0, 0.0))
    codons.append(value)
    return value


def _float32(value: float) -> float:
    return Const(value).value


def initialise(grammar: Grammar, rng: random.Random, min_depth: int,
               max_depth: int) -> Individual:
    """A random individual grown from an empty genotype, between ``min_depth`` and ``max_depth``.

    Below ``min_depth`` every node prefers productions that can still reach it (a 'full' start,
    so each branch grows, not just one); past it choices are uniform among those that fit
    ('grow'). Branches that cannot reach the minimum (the DLR condition) simply end, so the tree's
    deepest branch reaches ``min_depth`` whenever the grammar allows it.
    """
    if not 1 <= min_depth <= max_depth:
        raise ValueError(f"need 1 <= min_depth <= max_depth, got min_depth={min_depth}, "
                         f"max_depth={max_depth}")
    empty: Genotype = tuple(() for _ in grammar.rules)
    return map_genotype(grammar, empty, max_depth, rng, grow_until=min_depth)


def mutate_genotype(grammar: Grammar, individual: Individual, p_mut: float, max_depth: int,
                    rng: random.Random, *, p_const: float | None = None) -> Genotype:
    """Each used codon of a non-terminal with several options changes with probability p_mut.

    Constants change with probability ``p_const`` instead (``p_mut`` when None, as in the
    original system): the codons of constant rules (all-number rules, which step along their
    sorted values) and of free-constant rules (a Gaussian step in log space, see the module
    docstring). Everything else is structure and keeps ``p_mut``.

    The new codon is a different production among those that fit at the depth where the codon
    was used, so a mutation is never a silent no-op at the codon level and never breaks the depth
    limit there. (Duplicated alternatives count as different productions: a `grad` may become
    another `grad`, which is how the grammar's bias is meant to work.) Unused codons never change.
    """
    if p_const is None:
        p_const = p_mut
    for name, p in (("p_mut", p_mut), ("p_const", p_const)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    genes = [list(codons) for codons in individual.genotype]
    for nt, used_depths in enumerate(individual.codon_depths):
        codons = genes[nt]
        if grammar.free[nt]:
            for i in range(len(used_depths)):
                if rng.random() < p_const:
                    codons[i] = _step_constant(codons[i], rng)
            continue
        if len(grammar.rules[nt]) < 2:
            continue
        ladder = grammar.ladders[nt]
        rate = p_mut if ladder is None else p_const
        for i, depth in enumerate(used_depths):
            if rng.random() >= rate:
                continue
            if ladder is not None and rng.random() < LOCAL_CONSTANT_STEP:
                codons[i] = _neighbour(ladder, codons[i] % len(ladder), rng)
                continue
            options = [k for k in grammar.fitting(nt, max_depth - depth) if k != codons[i]]
            if options:
                codons[i] = rng.choice(options)
    return tuple(tuple(c) for c in genes)


# Share of constant mutations that step to a nearby constant instead of any constant. A uniform
# jump across 100 constants spanning 0..1 nearly always wrecks a working optimizer (measured on
# quick runs: children of good parents scored ~0.1); a step of one or two places along the
# sorted constants is the multiplicative nudge that symbolic-optimizer searches use, and the
# remaining uniform jumps keep the search global.
LOCAL_CONSTANT_STEP = 0.8


# The standard deviation of a free constant's Gaussian step in log space: a factor of about
# 1.35 either way for one sigma, so that most steps are nudges and a few are jumps.
FREE_CONSTANT_STEP = 0.3


def _step_constant(value: float, rng: random.Random) -> float:
    if value == 0.0:
        return _float32(10.0 ** rng.uniform(-4.0, 0.0))
    stepped = _float32(value * math.exp(rng.gauss(0.0, FREE_CONSTANT_STEP)))
    return stepped if math.isfinite(stepped) and stepped != 0.0 else value


def _neighbour(ladder: tuple[int, ...], codon: int, rng: random.Random) -> int:
    """A production 1, 2, 3... places away along the ladder (geometric, never the same)."""
    position = ladder.index(codon)
    step = 1
    while rng.random() < 0.5 and step < len(ladder) - 1:
        step += 1
    moved = position + (step if rng.random() < 0.5 else -step)
    if not 0 <= moved < len(ladder):
        moved = position - (moved - position)  # bounce off the end of the ladder
    return ladder[min(max(moved, 0), len(ladder) - 1)]


def mutate(grammar: Grammar, individual: Individual, p_mut: float, max_depth: int,
           rng: random.Random, *, p_const: float | None = None) -> Individual:
    """Mutate the used codons, then re-map (new subtrees may need fresh codons from ``rng``)."""
    genotype = mutate_genotype(grammar, individual, p_mut, max_depth, rng, p_const=p_const)
    return map_genotype(grammar, genotype, max_depth, rng)


def crossover(grammar: Grammar, a: Individual, b: Individual, max_depth: int,
              rng: random.Random) -> Individual:
    """Gene-level uniform crossover: each non-terminal's whole codon list from ``a`` or ``b``.

    Whole lists travel together because a list is only meaningful as a sequence consumed in
    order; mixing codons inside one list would scramble both parents' subtrees.
    """
    genotype = tuple(ga if rng.random() < 0.5 else gb for ga, gb in zip(a.genotype, b.genotype))
    return map_genotype(grammar, genotype, max_depth, rng)


def individual_from_text(grammar: Grammar, text: str, max_depth: int,
                         name: str = "program") -> Individual:
    """The individual whose phenotype is ``text`` (whitespace aside): how seeds enter SGE.

    Raises ValueError naming ``name`` when the text is not derivable in the grammar or its
    shallowest derivation is deeper than ``max_depth``.
    """
    try:
        tree = derive(grammar, text)
    except ValueError as err:
        raise ValueError(f"seed {name!r} {err}. A seed must use only the grammar's operators, "
                         "inputs and constants") from None
    if tree.depth > max_depth:
        raise ValueError(f"seed {name!r} needs a tree of depth {tree.depth}, above "
                         f"max_depth={max_depth}; simplify it or raise max_depth")
    genes: list[list[int | float]] = [[] for _ in grammar.rules]
    _collect(tree, genes)
    return map_genotype(grammar, tuple(tuple(c) for c in genes), max_depth)


def _collect(tree: Derivation, genes: list[list[int | float]]) -> None:
    """Codons in the mapper's order: pre-order, children left to right."""
    genes[tree.nt].append(tree.choice if tree.value is None else tree.value)
    for child in tree.children:
        _collect(child, genes)
