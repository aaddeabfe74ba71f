"""Structure-aware variation and diversity (EvolutionConfig's p_mut_const, remutate, niche_cap,
restart_after): small deterministic runs with synthetic fitness."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from engine.evolution.diversity import forced_change, remutated, stagnant
from engine.evolution.evolve import EvolutionConfig, evolve
from engine.modes import ALR as ALR_MODE
from engine.evolution.grammar import ALR_EXT_GRAMMAR, load_grammar, parse_grammar
from engine.evolution.seeds import ADAM_PAPER_OPS, SeedProgram, snap
from engine.evolution.sge import initialise, mutate
from engine.evolution.structure import canonical_key, structure_key
from test_evolve import ALR, SMALL, aligned, hashed

EXT = load_grammar(ALR_EXT_GRAMMAR)


# -- re-mutation ---------------------------------------------------------------------------------

def test_remutation_never_returns_an_equal_child_when_a_different_one_exists():
    """The worst case: a mutation that always gives the parent back. The last resort (one codon
    changed at a time) still finds a child with another canonical program."""
    rng = random.Random(0)
    for _ in range(40):
        parent = initialise(ALR, rng, 3, 8)
        taken = {canonical_key(parent.phenotype)}
        child = remutated(ALR, parent, parent, taken, canonical_key, 3, lambda i: i, 8, rng)
        assert canonical_key(child.phenotype) not in taken


def test_remutation_of_real_low_rate_mutations_differs_from_both_parents():
    rng = random.Random(1)
    for _ in range(40):
        a, b = initialise(EXT, rng, 3, 8), initialise(EXT, rng, 3, 8)
        taken = {canonical_key(a.phenotype), canonical_key(b.phenotype)}
        mutation = lambda i: mutate(EXT, i, 0.01, 8, rng, p_const=0.01)  # noqa: E731
        child = remutated(EXT, a, mutation(a), taken, canonical_key, 2, mutation, 8, rng)
        assert canonical_key(child.phenotype) not in taken


def test_remutation_gives_up_when_every_change_is_the_same_program():
    """mul(1.0, grad) is grad: no child can differ, and remutation ends instead of looping."""
    grammar = parse_grammar("<s> ::= weight: <e>\n<e> ::= grad | mul(1.0, grad)\n")
    parent = initialise(grammar, random.Random(0), 1, 3)
    taken = {canonical_key(parent.phenotype)}
    assert forced_change(grammar, parent, taken, canonical_key, 3, random.Random(0)) is None
    child = remutated(grammar, parent, parent, taken, canonical_key, 5, lambda i: i, 3,
                      random.Random(0))
    assert canonical_key(child.phenotype) in taken


def test_remutation_uses_the_callers_fingerprint():
    """A behavioural hook (here: the weight line's length) decides what counts as equal."""
    rng = random.Random(2)
    parent = initialise(ALR, rng, 3, 8)
    same = lambda text: len(text.split("weight:")[1])  # noqa: E731
    taken = {same(parent.phenotype)}
    child = remutated(ALR, parent, parent, taken, same, 2, lambda i: i, 8, rng)
    assert same(child.phenotype) not in taken


def repeats(result) -> int:
    """Children (non-elites) whose canonical program is in the previous generation."""
    count = 0
    for before, after in zip(result.history, result.history[1:]):
        old = {canonical_key(t) for t in before.phenotypes}
        count += sum(canonical_key(t) in old for t in after.phenotypes[SMALL.elitism:])
    return count


def test_remutate_in_a_run_cuts_repeated_children_and_stays_deterministic():
    config = EvolutionConfig(**{**SMALL.__dict__, "p_mut": 0.05, "generations": 5})
    plain = evolve(ALR, config, aligned)
    on = EvolutionConfig(**{**config.__dict__, "remutate": 3})
    first, second = evolve(ALR, on, aligned), evolve(ALR, on, aligned)
    assert first.history == second.history
    assert repeats(first) < repeats(plain)


# -- separate rates ------------------------------------------------------------------------------

def test_constant_rate_alone_moves_only_constants_in_a_run():
    """No crossover, no structural mutation: with p_mut_const=1 every child keeps a parent's
    structure and moves its constants; with p_mut_const=0 children are copies."""
    base = SMALL.__dict__ | {"p_cross": 0.0, "p_mut": 0.0, "generations": 3}
    moved = evolve(EXT, EvolutionConfig(**base | {"p_mut_const": 1.0}), aligned).history
    kept = evolve(EXT, EvolutionConfig(**base | {"p_mut_const": 0.0}), aligned).history
    for before, after in zip(kept, kept[1:]):
        assert set(after.phenotypes) <= set(before.phenotypes)
    changed = 0
    for before, after in zip(moved, moved[1:]):
        shapes = {structure_key(t) for t in before.phenotypes}
        for text in after.phenotypes[SMALL.elitism:]:
            assert structure_key(text) in shapes
            changed += text not in before.phenotypes
    assert changed > 0


def test_default_constant_rate_is_the_structural_one():
    assert evolve(ALR, SMALL, aligned).history == \
        evolve(ALR, EvolutionConfig(**SMALL.__dict__ | {"p_mut_const": SMALL.p_mut}),
               aligned).history


@pytest.mark.parametrize("change, message", [
    ({"p_mut_const": 1.5}, "p_mut_const must be a probability"),
    ({"remutate": -1}, "remutate must be 0 (off)"),
    ({"niche_cap": -2}, "niche_cap must be 0 (off)"),
    ({"restart_after": 1.5}, "restart_after must be an int"),
])
def test_bad_options_are_refused(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EvolutionConfig(**SMALL.__dict__ | change)


# -- niches --------------------------------------------------------------------------------------

ADAM = snap(SeedProgram("adam", ADAM_PAPER_OPS), ALR, ALR_MODE, 17)
ADAM_SHAPE = structure_key(ADAM)


def adam_shaped_wins(texts):
    """One seed's structure is far fitter than anything else: its descendants would take over."""
    return [1.0 + hashed(t) if structure_key(t) == ADAM_SHAPE else hashed(t) for t in texts]


NICHED = EvolutionConfig(population=12, generations=6, elitism=2, tournament=3, p_cross=0.0,
                         p_mut=0.0, p_mut_const=0.3, min_depth=3, max_depth=17, seed=5)


def largest_niche(record) -> int:
    return max(Counter(structure_key(t) for t in record.phenotypes).values())


def test_without_a_cap_one_seeds_structure_takes_the_population():
    history = evolve(ALR, NICHED, adam_shaped_wins, seeds={"adam": ADAM}).history
    assert largest_niche(history[-1]) > NICHED.population // 2


def test_a_niche_cap_keeps_other_structures_in_the_population():
    config = EvolutionConfig(**NICHED.__dict__ | {"niche_cap": 3})
    history = evolve(ALR, config, adam_shaped_wins, seeds={"adam": ADAM}).history
    for record in history[1:]:
        assert largest_niche(record) <= 3
        assert ADAM_SHAPE in {structure_key(t) for t in record.phenotypes}  # the best stays


# -- restarts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bests, after, expected", [
    ([1, 1, 1], 2, True), ([1, 2, 2], 2, False), ([1, 1, 1, 1], 2, False),
    ([1, 1, 1, 1, 1], 2, True), ([1, 2, 3], 1, False), ([3, 1], 1, True), ([1, 1, 1], 0, False),
])
def test_stagnation_counts_generations_since_the_last_improvement(bests, after, expected):
    assert stagnant(bests, after) is expected


def flat(texts):
    """Nothing ever improves on generation 0: every run stagnates."""
    return [0.5] * len(texts)


def test_a_stagnant_run_restarts_from_its_hall_of_fame():
    config = EvolutionConfig(**SMALL.__dict__ | {"restart_after": 2, "max_depth": 17})
    seen = []

    def fitness(texts):
        seen.append(list(texts))
        return [0.9 if t == ADAM else 0.5 for t in texts]

    history = evolve(ALR, config, fitness, seeds={"adam": ADAM}).history
    plain = evolve(ALR, SMALL, flat).history
    # Generations 3 and 5 are restarts (2 and 4 generations without improvement): the hall of
    # fame (a quarter of the population) first, with its recorded fitness, then fresh programs.
    for generation in (3, 5):
        record = history[generation]
        assert record.phenotypes[0] == ADAM and record.fitness[0] == 0.9
        assert record.evaluated == len(set(record.phenotypes[3:]))
        earlier = {t for r in history[:generation] for t in r.phenotypes}
        assert not set(record.phenotypes[3:]) & earlier  # fresh, not bred
    assert history[4].phenotypes[0] == ADAM  # ordinary generations in between
    assert len(plain) == len(history)


def test_a_resumed_run_with_every_option_on_replays_the_uninterrupted_one(tmp_path):
    config = EvolutionConfig(**SMALL.__dict__ | {"remutate": 2, "niche_cap": 4,
                                                 "restart_after": 2, "p_mut_const": 0.5})
    whole = evolve(EXT, config, aligned)
    calls = [0]

    def dies(texts):
        if calls[0] == 3:
            raise RuntimeError("killed")
        calls[0] += 1
        return aligned(texts)

    with pytest.raises(RuntimeError):
        evolve(EXT, config, dies, checkpoint_dir=tmp_path)
    resumed = evolve(EXT, config, aligned, checkpoint_dir=tmp_path, resume=True)
    assert resumed.history == whole.history
    assert resumed.population == whole.population


def test_a_checkpoint_written_before_the_options_existed_still_resumes(tmp_path):
    """Such a checkpoint's config lacks the new fields: they read as their defaults (off)."""
    from engine.rundir import checkpoint_files, load_checkpoint, write_checkpoint

    config = EvolutionConfig(**SMALL.__dict__ | {"generations": 3})
    evolve(ALR, config, aligned, checkpoint_dir=tmp_path)
    newest = checkpoint_files(tmp_path)[0]
    body = load_checkpoint(newest)
    for name in ("p_mut_const", "remutate", "niche_cap", "restart_after"):
        del body["config"][name]
    body = {k: v for k, v in body.items() if k not in ("format", "version")}
    write_checkpoint(tmp_path, body["generation"], body)
    longer = EvolutionConfig(**SMALL.__dict__ | {"generations": 5})
    resumed = evolve(ALR, longer, aligned, checkpoint_dir=tmp_path, resume=True)
    assert resumed.history == evolve(ALR, longer, aligned).history
