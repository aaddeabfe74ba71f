"""The extended ALR grammar (alr_ext.bnf): the zoo enters it exactly, and free constants."""

from __future__ import annotations

import math
import random

import pytest

from codegen.ir import Const, Program, walk
from engine.modes import ALR as ALR_MODE
from engine.evolution.grammar import ALR_EXT_GRAMMAR, ALR_GRAMMAR, load_grammar, parse_grammar
from engine.evolution.seeds import ADABELIEF_PAPER_OPS, ADAM_PAPER_OPS, LION_PAPER_OPS, SeedProgram, \
    snap, with_lr
from engine.evolution.sge import initialise, map_genotype, mutate_genotype
from engine.evolution.sge import individual_from_text
from kernels import zoo

EXT = load_grammar(ALR_EXT_GRAMMAR)
MAX_DEPTH = 17  # EvolutionConfig's default: the seeds must fit the default search
LR = 0.001

PROGRAMS = {**{f"zoo.{name}": str(factory()) for name, factory in zoo.ZOO.items()},
            "ADAM_PAPER_OPS": ADAM_PAPER_OPS, "ADABELIEF_PAPER_OPS": ADABELIEF_PAPER_OPS,
            "LION_PAPER_OPS": LION_PAPER_OPS}


def written_in(text: str, lr: float) -> Program:
    program = Program.parse(text)
    return Program(**{t: (None if e is None else with_lr(e, lr))
                      for t, e in program.deltas().items()})


@pytest.mark.parametrize("name", PROGRAMS)
def test_every_zoo_optimizer_is_a_phenotype_with_the_same_canonical_program(name):
    """Snapping is the identity in a grammar with free constants: the derived individual's
    phenotype is the zoo program itself (lr written in), canonical hash for canonical hash, and
    its genotype maps back to it with no randomness."""
    expected = written_in(PROGRAMS[name], LR)
    text = snap(SeedProgram(name, PROGRAMS[name], LR), EXT, ALR_MODE, MAX_DEPTH)
    individual = individual_from_text(EXT, text, MAX_DEPTH, name)
    assert Program.parse(individual.phenotype).hash == expected.hash
    assert Program.parse(individual.phenotype).canonical() == expected.canonical()
    assert map_genotype(EXT, individual.genotype, MAX_DEPTH).phenotype == individual.phenotype


def test_the_zoo_holds_each_optimizer_the_issue_names():
    for name in ("adam", "lion", "signum", "adabelief", "adagrad", "rmsprop", "momentum",
                 "nesterov", "ades"):
        assert name in zoo.ZOO


def test_the_modes_seeds_enter_exactly():
    for seed in ALR_MODE.zoo_seeds():
        text = snap(seed, EXT, ALR_MODE, MAX_DEPTH)
        assert Program.parse(text).hash == written_in(seed.text, seed.lr).hash


def test_the_paper_grammar_still_snaps_its_constants():
    """The identity is for free constants only: alr.bnf keeps its 100-value table."""
    text = snap(SeedProgram("adam", ADAM_PAPER_OPS, LR), load_grammar(ALR_GRAMMAR), ALR_MODE,
                MAX_DEPTH)
    assert Program.parse(text).hash != written_in(ADAM_PAPER_OPS, LR).hash


def test_signum_is_the_algorithm():
    """m <- 0.9 m + 0.1 g; p <- p - lr sign(m), over three steps, in float32."""
    import numpy as np

    from codegen.ir import reference_step
    rng = np.random.default_rng(0)
    program, state, weight, m = zoo.signum(), {}, np.ones(5, np.float32), np.zeros(5, np.float32)
    for _ in range(3):
        grad = rng.standard_normal(5).astype(np.float32)
        m = np.float32(0.9) * m + np.float32(0.1) * grad
        want = weight - np.float32(0.01) * np.sign(m)
        weight, state = reference_step(program, weight, grad, state, lr=0.01)
        np.testing.assert_array_equal(weight, want)


# -- free constants -----------------------------------------------------------------------------

def constants(text: str) -> list[float]:
    return [n.value for e in Program.parse(text).deltas().values() if e is not None
            for n in walk(e) if isinstance(n, Const)]


def test_random_individuals_are_programs_with_drawn_constants_that_map_back():
    rng = random.Random(0)
    drawn = []
    for _ in range(30):
        individual = initialise(EXT, rng, 6, MAX_DEPTH)
        Program.parse(individual.phenotype)  # every phenotype is a valid program
        assert map_genotype(EXT, individual.genotype, MAX_DEPTH).phenotype == individual.phenotype
        drawn += constants(individual.phenotype)
    assert drawn and all(1e-4 <= v <= 1.0 for v in drawn)
    assert len(set(drawn)) > len(drawn) // 2  # real values, not a small table


def free_codons(individual):
    return [c for nt, codons in enumerate(individual.genotype) if EXT.free[nt]
            for c in codons[:len(individual.codon_depths[nt])]]


def structure_codons(individual):
    return [codons[:len(individual.codon_depths[nt])]
            for nt, codons in enumerate(individual.genotype) if not EXT.free[nt]]


def test_constant_mutation_is_a_log_space_step_that_keeps_the_sign():
    seed = snap(SeedProgram("adam", PROGRAMS["zoo.adam"], LR), EXT, ALR_MODE, MAX_DEPTH)
    parent = individual_from_text(EXT, seed, MAX_DEPTH)
    rng = random.Random(1)
    ratios = []
    for _ in range(20):
        genotype = mutate_genotype(EXT, parent, 0.0, MAX_DEPTH, rng, p_const=1.0)
        child = map_genotype(EXT, genotype, MAX_DEPTH)
        assert structure_codons(child) == structure_codons(parent)  # structure untouched
        for old, new in zip(free_codons(parent), free_codons(child)):
            if old != 0.0:
                assert math.copysign(1, new) == math.copysign(1, old)
                ratios.append(math.log(new / old))
    assert any(r != 0 for r in ratios)
    spread = (sum(r * r for r in ratios) / len(ratios)) ** 0.5
    assert 0.2 < spread < 0.4  # FREE_CONSTANT_STEP = 0.3


def test_structure_and_constant_rates_are_separate():
    seed = snap(SeedProgram("adam", PROGRAMS["zoo.adam"], LR), EXT, ALR_MODE, MAX_DEPTH)
    parent = individual_from_text(EXT, seed, MAX_DEPTH)
    rng = random.Random(2)
    genotype = mutate_genotype(EXT, parent, 1.0, MAX_DEPTH, rng, p_const=0.0)
    free = [nt for nt in range(len(EXT.rules)) if EXT.free[nt]]
    assert [genotype[nt] for nt in free] == [parent.genotype[nt] for nt in free]
    child = map_genotype(EXT, genotype, MAX_DEPTH, rng)
    assert structure_codons(child) != structure_codons(parent)
    unchanged = mutate_genotype(EXT, parent, 0.0, MAX_DEPTH, rng, p_const=0.0)
    assert unchanged == parent.genotype


def test_paper_grammar_constants_use_the_constant_rate():
    """In alr.bnf the constant rules are the all-number rules: p_const alone moves them."""
    paper = load_grammar(ALR_GRAMMAR)
    seed = snap(SeedProgram("adam", ADAM_PAPER_OPS, LR), paper, ALR_MODE, MAX_DEPTH)
    parent = individual_from_text(paper, seed, MAX_DEPTH)
    genotype = mutate_genotype(paper, parent, 0.0, MAX_DEPTH, random.Random(3), p_const=1.0)
    changed = {nt for nt, (a, b) in enumerate(zip(parent.genotype, genotype)) if a != b}
    assert changed and all(paper.ladders[nt] is not None for nt in changed)


def test_a_number_out_of_float32_range_is_not_derivable():
    grammar = parse_grammar("<s> ::= weight: mul(<c>, grad)\n<c> ::= %float\n")
    with pytest.raises(ValueError, match="a number"):
        individual_from_text(grammar, "weight: mul(1e60, grad)", 5)
    assert individual_from_text(grammar, "weight: mul(-2.5e-3, grad)", 5).genotype[1] == \
        (Const(-2.5e-3).value,)


def test_a_bad_free_codon_is_refused():
    grammar = parse_grammar("<s> ::= weight: mul(<c>, grad)\n<c> ::= %float\n")
    with pytest.raises(ValueError, match="finite number"):
        map_genotype(grammar, ((0,), (math.inf,)), 5)
