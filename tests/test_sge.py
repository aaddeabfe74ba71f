"""SGE: mapping, depth control, initialisation, mutation, crossover and seeds from text."""

from __future__ import annotations

import random
import statistics
from collections import Counter

import pytest

from codegen.ir import Program, Schedule
from engine.evolution.grammar import ALR_GRAMMAR, DLR_GRAMMAR, load_grammar, parse_grammar
from engine.evolution.sge import (crossover, individual_from_text, initialise, map_genotype, mutate,
                        mutate_genotype)

ALR = load_grammar(ALR_GRAMMAR)
DLR = load_grammar(DLR_GRAMMAR)
# (grammar, min_depth, max_depth): the reference's 6..17 for ALR; DLR trees are binary at every
# level, so a smaller range keeps schedules readable.
SETTINGS = {"alr": (ALR, 6, 17), "dlr": (DLR, 3, 10)}


def plain_map(grammar, genotype, nt=0, depth=1, used=None):
    """An independent recursive mapper that follows codons as they are (no repair, no growth):
    a mapped genotype must already be consistent with it, phenotype and depth alike."""
    used = used if used is not None else Counter()
    choice = genotype[nt][used[nt]]
    used[nt] += 1
    parts, deepest = [], depth
    for sym in grammar.rules[nt][choice].symbols:
        if isinstance(sym, str):
            parts.append(sym)
        else:
            text, d = plain_map(grammar, genotype, sym, depth + 1, used)
            parts.append(text)
            deepest = max(deepest, d)
    return "".join(parts), deepest


def summary(values) -> str:
    q = statistics.quantiles(values, n=10)
    return (f"min {min(values)} p10 {q[0]:.0f} median {statistics.median(values):.0f} "
            f"p90 {q[-1]:.0f} max {max(values)}")


@pytest.mark.parametrize("mode", ["alr", "dlr"])
def test_10000_random_individuals_parse_and_respect_depth(mode):
    parse = Program.parse if mode == "alr" else Schedule.parse
    grammar, lo, hi = SETTINGS[mode]
    rng = random.Random(2024)
    population = [initialise(grammar, rng, lo, hi) for _ in range(10_000)]
    for ind in population:
        assert lo <= ind.depth <= hi, ind.phenotype
        parse(ind.phenotype)
    for ind in population[:300]:
        assert plain_map(grammar, ind.genotype) == (ind.phenotype, ind.depth)
    depths = Counter(ind.depth for ind in population)
    print(f"\n{mode} depth {lo}..{hi}: " + " ".join(f"{d}:{n}" for d, n in sorted(depths.items())))
    print(f"{mode} size (nodes): {summary([ind.size for ind in population])}")
    print(f"{mode} length (chars): {summary([len(ind.phenotype) for ind in population])}")
    assert len({ind.phenotype for ind in population}) > 9_000  # diverse, not stuck on one shape


def test_same_rng_same_individuals_and_remapping_is_pure():
    a = [initialise(ALR, random.Random(7), 6, 17) for _ in range(3)]
    b = [initialise(ALR, random.Random(7), 6, 17) for _ in range(3)]
    assert a == b
    for ind in a:
        assert map_genotype(ALR, ind.genotype, 17) == ind  # no rng needed, nothing changes


def test_depth_control_repairs_codons_that_do_not_fit():
    # Every <expr_*> codon asks for <fun_*> and every <fun_*> codon for neg(...): without depth
    # control this never ends. Repair: fits[c % len(fits)], so a <fun_a> codon 0 at the limit
    # becomes the only fitting production, <const_a>; an <expr_a> codon 0 becomes <term_a>.
    genotype = [[0] for _ in ALR.names]
    for f in "absw":
        genotype[ALR.index(f"expr_{f}")] = [0] * 20
        genotype[ALR.index(f"fun_{f}")] = [0] * 20
    for max_depth in (3, 4, 5, 8, 17):
        ind = map_genotype(ALR, tuple(map(tuple, genotype)), max_depth)
        assert ind.depth <= max_depth
        assert plain_map(ALR, ind.genotype) == (ind.phenotype, ind.depth)
    ind = map_genotype(ALR, tuple(map(tuple, genotype)), 8)
    assert ind.phenotype.splitlines()[0] == "alpha: neg(neg(0.0))"
    assert ind.depth == 8
    ind = map_genotype(ALR, tuple(map(tuple, genotype)), 3)
    # expr -> term at depth 3, where <const_a> no longer fits: codon 0 -> fits[0] = alpha
    assert ind.phenotype.splitlines()[0] == "alpha: alpha"


def test_depth_limit_holds_for_indirect_recursion_in_any_grammar():
    # s -> a -> f(b) -> g(a, a) ...: recursion only through another non-terminal.
    grammar = parse_grammar("<s> ::= <a>\n<a> ::= f(<b>) | x\n<b> ::= g(<a>, <a>) | h(<b>)\n")
    rng = random.Random(3)
    for _ in range(500):
        ind = initialise(grammar, rng, 2, 7)
        assert ind.depth <= 7
        assert plain_map(grammar, ind.genotype) == (ind.phenotype, ind.depth)


def test_min_depth_grows_every_branch_that_can():
    rng = random.Random(5)
    for _ in range(200):
        ind = initialise(ALR, rng, 6, 17)
        for line in ind.phenotype.splitlines():
            assert "(" in line  # each function has at least one operator at min depth 6


def test_bad_genotypes_and_settings_are_refused():
    good = initialise(DLR, random.Random(1), 3, 10)
    with pytest.raises(ValueError, match="5 non-terminals; it belongs to another grammar"):
        map_genotype(DLR, good.genotype[:3], 10)
    broken = (good.genotype[0],) + ((999,),) + good.genotype[2:]
    if good.codon_depths[1]:
        with pytest.raises(ValueError, match="codon 0 of <cond> is 999, but it has only 2"):
            map_genotype(DLR, broken, 10)
    with pytest.raises(ValueError, match="ran out and no rng"):
        map_genotype(DLR, tuple(() for _ in DLR.names), 10)
    with pytest.raises(ValueError, match="max_depth=2 is below the shallowest tree"):
        map_genotype(ALR, initialise(ALR, random.Random(1), 3, 6).genotype, 2)
    with pytest.raises(ValueError, match="need 1 <= min_depth <= max_depth"):
        initialise(ALR, random.Random(1), 9, 8)


@pytest.mark.parametrize("mode", ["alr", "dlr"])
def test_mutation_changes_only_used_codons_to_different_fitting_options(mode):
    grammar, lo, hi = SETTINGS[mode]
    rng = random.Random(11)
    for _ in range(300):
        ind = initialise(grammar, rng, lo, hi)
        new = mutate_genotype(grammar, ind, 0.3, hi, rng)
        for nt, (old_codons, new_codons) in enumerate(zip(ind.genotype, new)):
            assert len(old_codons) == len(new_codons)
            used = len(ind.codon_depths[nt])
            assert old_codons[used:] == new_codons[used:]  # unused codons untouched
            for i in range(used):
                if old_codons[i] != new_codons[i]:
                    assert len(grammar.rules[nt]) > 1
                    budget = hi - ind.codon_depths[nt][i]
                    assert new_codons[i] in grammar.fitting(nt, budget)
    ind = initialise(grammar, rng, lo, hi)
    assert mutate_genotype(grammar, ind, 0.0, hi, rng) == ind.genotype


def test_mutation_with_certainty_changes_every_used_multi_option_codon():
    ind = initialise(DLR, random.Random(4), 3, 10)
    new = mutate_genotype(DLR, ind, 1.0, 10, random.Random(4))
    for nt, depths in enumerate(ind.codon_depths):
        for i, depth in enumerate(depths):
            if len(DLR.fitting(nt, 10 - depth)) > 1:
                assert new[nt][i] != ind.genotype[nt][i]


def test_constant_mutations_mostly_step_to_a_neighbouring_constant():
    """Most constant mutations move one or two places along the sorted constants (a small,
    multiplicative-like nudge); some still jump anywhere."""
    rng = random.Random(5)
    steps = Counter()
    for _ in range(200):
        ind = initialise(ALR, rng, 6, 17)
        new = mutate_genotype(ALR, ind, 1.0, 17, rng)
        for nt, ladder in enumerate(ALR.ladders):
            if ladder is None:
                continue
            for i in range(len(ind.codon_depths[nt])):
                before, after = ind.genotype[nt][i], new[nt][i]
                assert before != after
                steps[abs(ladder.index(after) - ladder.index(before))] += 1
    total = sum(steps.values())
    near = steps[1] + steps[2]
    assert total > 500
    assert 0.5 < near / total < 0.8, steps  # 0.8 local x 0.75 (steps of 1-2) + uniform hits
    assert sum(n for step, n in steps.items() if step > 10) > 0.05 * total  # global jumps remain


@pytest.mark.parametrize("mode", ["alr", "dlr"])
def test_variation_yields_valid_individuals_within_the_depth_limit(mode):
    parse = Program.parse if mode == "alr" else Schedule.parse
    grammar, lo, hi = SETTINGS[mode]
    rng = random.Random(99)
    population = [initialise(grammar, rng, lo, hi) for _ in range(50)]
    for _ in range(1_000):
        a, b = rng.sample(population, 2)
        child = crossover(grammar, a, b, hi, rng)
        assert child.depth <= hi
        child = mutate(grammar, child, 0.15, hi, rng)
        assert child.depth <= hi
        assert plain_map(grammar, child.genotype) == (child.phenotype, child.depth)
        parse(child.phenotype)
        population[rng.randrange(len(population))] = child


def test_crossover_takes_whole_lists_from_either_parent():
    rng = random.Random(8)
    a = initialise(ALR, rng, 6, 17)
    b = initialise(ALR, rng, 6, 17)
    seen_a = seen_b = False
    for _ in range(50):
        # map with a huge depth so that no repair interferes: each list is one parent's prefix
        child = crossover(ALR, a, b, 10_000, rng)
        for nt, codons in enumerate(child.genotype):
            ga, gb = a.genotype[nt], b.genotype[nt]
            from_a = codons[:len(ga)] == ga
            from_b = codons[:len(gb)] == gb
            assert from_a or from_b
            seen_a |= from_a and ga != gb
            seen_b |= from_b and ga != gb
    assert seen_a and seen_b


@pytest.mark.parametrize("mode", ["alr", "dlr"])
def test_individual_from_text_round_trips(mode):
    grammar, lo, hi = SETTINGS[mode]
    rng = random.Random(21)
    for _ in range(40):
        ind = initialise(grammar, rng, lo, hi)
        back = individual_from_text(grammar, ind.phenotype.replace(", ", ","), hi)
        assert back.phenotype == ind.phenotype
        assert back.depth <= ind.depth


def test_seed_written_with_grammar_constants():
    # RMSprop-like, with constants of the grammar: beta an EMA of grad^2, weight grad/sqrt(beta).
    text = """alpha: 0.0
beta: mul(0.10705215, sub(beta, square(grad)))
sigma: 0.0
weight: mul(0.00093905505, div(grad, add(sqrt(beta), 5.556065e-05)))"""
    ind = individual_from_text(ALR, text, 17, name="rmsprop")
    assert ind.phenotype == text
    stuck = r"seed 'adam' not derivable .* line 2, column 11 expected one of '0.0'"
    with pytest.raises(ValueError, match=stuck):
        individual_from_text(ALR, text.replace("0.10705215", "0.1"), 17, name="adam")
    # start, expr, mul, expr, div, expr, add, expr, sqrt, expr, term -> beta: depth 11
    with pytest.raises(ValueError, match="seed 'deep' needs a tree of depth 11, above max_depth=10"):
        individual_from_text(ALR, text, 10, name="deep")
