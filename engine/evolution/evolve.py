"""The generational loop: select, vary, evaluate, replace; a checkpoint after every generation.

The loop owns no evaluation machinery: a fitness function receives each generation's batch of
new phenotype texts and returns their fitness, so the caller decides how to run them (serially, a
process pool, Ray) and in what order results come back. Fitness is maximised (accuracy); a failed
candidate simply gets a low, finite floor value.

Reproducibility is the design constraint everything else follows from:
- All randomness of generation ``g`` comes from one ``random.Random`` derived from (seed, g), not
  from a generator threaded through the run. The state after a generation is therefore just the
  population and the history, which is exactly what a checkpoint stores, and a run resumed after
  generation k replays generations k+1.. bit for bit like an uninterrupted one.
- Fitness values are placed by index, never by arrival order, so the history does not depend on
  which worker finished first.
- Constant refinement has a random stream of its own per generation, and the checkpoint keeps
  the structures it refined, so a resumed run refines what the uninterrupted one did.
- Checkpoints are JSON with a SHA-256 of their body inside, written to a temporary file and moved
  into place with ``os.replace``, so a reader sees a whole file or none (`engine.rundir`). The two
  newest are kept: a corrupt or truncated newest file is refused with a warning and the previous
  one is used.
"""

from __future__ import annotations

import hashlib
import math
import operator
import random
import statistics
import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from engine.evolution.grammar import Grammar
from engine.rundir import CheckpointError, checkpoint_files, load_checkpoint, newest_checkpoint, \
    write_checkpoint
from engine.evolution.diversity import hall_of_fame, mutation_with, remutated, stagnant
from engine.evolution.refine import check_refinable, refine
from engine.evolution.sge import Individual, crossover, individual_from_text, initialise, map_genotype
from engine.evolution.structure import canonical_key, structure_key

__all__ = [
    "CheckpointError",
    "EvolutionConfig",
    "FitnessFunction",
    "GenerationRecord",
    "RunResult",
    "Scored",
    "evolve",
    "load_checkpoint",
]

# A batch of texts in, either a list of fitness values aligned with the batch or (index, fitness)
# pairs in any order (e.g. as futures complete).
FitnessFunction = Callable[[Sequence[str]], Iterable[float] | Iterable[tuple[int, float]]]

# The checkpoint files themselves (format, checksum, atomic write, the scan for the newest good
# one) are engine.rundir's; CheckpointError and load_checkpoint are re-exported from here.

@dataclass(frozen=True)
class EvolutionConfig:
    """Everything that determines a run, besides the grammar, the seeds and the fitness function.

    ``generations`` counts evaluated populations, the random initial one being generation 0. It
    is the only field that may change when resuming (to extend a run). Depths follow
    engine.evolution.grammar: the start symbol is at depth 1. Defaults follow the original system
    (docs/protocol.md, "Search settings"): its example config's elitism, tournament, rates and
    depths, the population of 20 of its real ALR runs, and the 100 generations of its later work.

    The options after ``seed`` change the search away from the original system and are off by
    default, so a run without them is the paper's, bit for bit (engine/evolution/diversity.py):
    - ``p_mut_const``: the mutation rate of constants (the codons of all-number rules and of free
      constants), ``p_mut`` then being the rate of structure only. None: ``p_mut`` for both, as
      the original system did. (Its later work used 0.15 on constants against 0.01-0.05 on
      structure, and found mostly constant tweaks.)
    - ``remutate``: a child whose canonical program (or, when the caller passes ``same`` to
      ``evolve``, its behavioural fingerprint) equals a parent's is mutated again, up to this many
      times, then changed one codon at a time until it differs; 0: off.
    - ``niche_cap``: at most this many members of a new population share a structure (the
      canonical tree with constants left out); a child over the cap is bred again, and after
      NICHE_TRIES failures replaced by a random individual. 0: off.
    - ``restart_after``: after this many generations without a better best, the next population
      is the run's hall of fame (its best distinct programs, a quarter of the population, kept
      with their fitness) filled up with random individuals. 0: off.
    - ``refine_constants``: after each generation's evaluation (generation 0 and restarts too),
      the K best members a funnel promoted past its first tier, one per structure not refined
      before in the run, get a (1+6) local search of 3 steps on their free constants
      (engine/evolution/refine.py), each step one fitness batch, counted in ``evaluated``. A
      fitter variant takes its original's place before the generation is recorded, so the next
      generation is bred from it and elitism carries it (replacing the worst instead would keep
      the strictly worse original too, crowding one niche). Needs free constants
      (``<x> ::= %float``); a fitness without tiers (in [0, 1]) promotes nobody. 0: off.
    """

    population: int = 20
    generations: int = 100
    elitism: int = 1
    tournament: int = 5
    p_cross: float = 0.9
    p_mut: float = 0.15
    min_depth: int = 6
    max_depth: int = 17
    seed: int = 0
    p_mut_const: float | None = None
    remutate: int = 0
    niche_cap: int = 0
    restart_after: int = 0
    refine_constants: int = 0

    def __post_init__(self) -> None:
        def bad(message: str) -> None:
            raise ValueError(f"EvolutionConfig: {message}")

        for name in ("population", "generations", "elitism", "tournament", "min_depth",
                     "max_depth", "seed", "remutate", "niche_cap", "restart_after",
                     "refine_constants"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                bad(f"{name} must be an int, got {value!r}")
        if self.population < 1:
            bad(f"population must be at least 1, got {self.population}")
        if self.generations < 1:
            bad(f"generations must be at least 1 (generation 0 is the initial population), "
                f"got {self.generations}")
        if not 0 <= self.elitism < self.population:
            bad(f"elitism must be in [0, population), got {self.elitism} with population "
                f"{self.population}")
        if not 1 <= self.tournament <= self.population:
            bad(f"tournament must be in [1, population], got {self.tournament}")
        for name in ("p_cross", "p_mut", "p_mut_const"):
            value = getattr(self, name)
            if name == "p_mut_const" and value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) \
                    or not 0.0 <= value <= 1.0:
                bad(f"{name} must be a probability in [0, 1], got {value!r}")
        for name in ("remutate", "niche_cap", "restart_after", "refine_constants"):
            if getattr(self, name) < 0:
                bad(f"{name} must be 0 (off) or a positive count, got {getattr(self, name)}")
        if not 1 <= self.min_depth <= self.max_depth:
            bad(f"need 1 <= min_depth <= max_depth, got {self.min_depth} and {self.max_depth}")


@dataclass(frozen=True)
class Scored:
    """An individual with its fitness; elites carry theirs into the next generation."""

    individual: Individual
    fitness: float


@dataclass(frozen=True)
class GenerationRecord:
    """What happened in one generation, in population order (elites first)."""

    generation: int
    phenotypes: tuple[str, ...]
    fitness: tuple[float, ...]
    best: float
    median: float
    worst: float
    best_phenotype: str
    evaluated: int  # distinct new texts sent to the fitness function

    def to_json(self) -> dict:
        return {**asdict(self), "phenotypes": list(self.phenotypes),
                "fitness": list(self.fitness)}

    @classmethod
    def from_json(cls, data: dict) -> GenerationRecord:
        return cls(**{**data, "phenotypes": tuple(data["phenotypes"]),
                      "fitness": tuple(data["fitness"])})


@dataclass(frozen=True)
class RunResult:
    history: tuple[GenerationRecord, ...]
    population: tuple[Scored, ...]

    @property
    def best(self) -> tuple[str, float]:
        """The best (phenotype, fitness) ever evaluated, the earliest on ties."""
        top = max(self.history, key=lambda r: r.best)  # max keeps the first maximum
        return top.best_phenotype, top.best


def evolve(grammar: Grammar, config: EvolutionConfig, fitness: FitnessFunction, *,
           seeds: Mapping[str, str] | Sequence[str] = (),
           checkpoint_dir: str | Path | None = None, resume: bool = False,
           on_generation: Callable[[GenerationRecord], None] | None = None,
           same: Callable[[str], Hashable] | None = None) -> RunResult:
    """Run (or resume) an evolution and return its history and final population.

    ``seeds`` are program texts placed in the initial population (a mapping gives them names for
    error messages); each must be derivable in the grammar within ``config.max_depth``.
    With ``resume`` the newest good checkpoint in ``checkpoint_dir`` is continued; an empty
    directory starts afresh. ``on_generation`` sees each new record, e.g. for a progress bar.
    ``same`` maps a phenotype to what makes two children the same for ``config.remutate`` (e.g.
    a behavioural fingerprint); by default the canonical program (engine.evolution.structure).
    """
    named = _named_seeds(seeds)
    if len(named) > config.population:
        raise ValueError(f"{len(named)} seeds do not fit in a population of {config.population}")
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume and directory is None:
        raise ValueError("resume=True needs the checkpoint_dir of the run to resume")
    if config.refine_constants:
        check_refinable(grammar)
    identity = _identity(grammar, config, named)

    state = None
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        state = _resume_state(directory, identity, grammar, config) if resume else None
        if not resume and checkpoint_files(directory):
            raise CheckpointError(f"{directory} already holds checkpoints of a run; pass "
                                  "resume=True (--resume) to continue it or use an empty directory")
    refined: set[str] = set()  # structure keys whose constants were refined (refine_constants)
    if state is None:
        population, evaluated = _initial_population(grammar, config, named, fitness)
        evaluated += _refine(grammar, config, 0, population, fitness, refined)
        history = [_record(0, population, evaluated)]
        _after_generation(directory, identity, population, history, refined, on_generation)
    else:
        population, history, refined = state
    for generation in range(len(history), config.generations):
        if stagnant([r.best for r in history], config.restart_after):
            population, evaluated = _restart(grammar, config, generation, population, history,
                                             fitness)
        else:
            population, evaluated = _next_generation(grammar, config, generation, population,
                                                     fitness, same or canonical_key)
        evaluated += _refine(grammar, config, generation, population, fitness, refined)
        history.append(_record(generation, population, evaluated))
        _after_generation(directory, identity, population, history, refined, on_generation)
    return RunResult(history=tuple(history), population=tuple(population))


# -- one generation --------------------------------------------------------------------------

def _generation_rng(config: EvolutionConfig, generation: int) -> random.Random:
    """The one source of randomness for a generation; a str seed hashes stably (SHA-512)."""
    return random.Random(f"autolr.evolve/{config.seed}/{generation}")


def _initial_population(grammar: Grammar, config: EvolutionConfig,
                        named: list[tuple[str, str]],
                        fitness: FitnessFunction) -> tuple[list[Scored], int]:
    rng = _generation_rng(config, 0)
    members = [individual_from_text(grammar, text, config.max_depth, name)
               for name, text in named]
    while len(members) < config.population:
        members.append(initialise(grammar, rng, config.min_depth, config.max_depth))
    texts = [m.phenotype for m in members]
    values = _evaluate(texts, fitness)
    return [Scored(m, f) for m, f in zip(members, values)], len(set(texts))


def _next_generation(grammar: Grammar, config: EvolutionConfig, generation: int,
                     parents: list[Scored], fitness: FitnessFunction,
                     same: Callable[[str], Hashable]) -> tuple[list[Scored], int]:
    rng = _generation_rng(config, generation)
    ranked = sorted(range(len(parents)), key=lambda i: (-parents[i].fitness, i))
    elites = [parents[i] for i in ranked[:config.elitism]]
    mutation = mutation_with(grammar, config.p_mut, config.p_mut_const, config.max_depth, rng)

    def breed() -> Individual:
        if rng.random() < config.p_cross:
            family = (_tournament(parents, config.tournament, rng),
                      _tournament(parents, config.tournament, rng))
            base = crossover(grammar, family[0].individual, family[1].individual,
                             config.max_depth, rng)
        else:
            family = (_tournament(parents, config.tournament, rng),)
            base = family[0].individual
        child = mutation(base)
        if config.remutate:
            taken = {same(p.individual.phenotype) for p in family}
            child = remutated(grammar, base, child, taken, same, config.remutate, mutation,
                              config.max_depth, rng)
        return child

    niches = Counter(structure_key(e.individual.phenotype) for e in elites
                     if config.niche_cap)
    children: list[Individual] = []
    while len(elites) + len(children) < config.population:
        child = breed()
        if config.niche_cap:
            child = _within_cap(child, breed, niches, grammar, config, rng)
        children.append(child)
    texts = [c.phenotype for c in children]
    values = _evaluate(texts, fitness)
    return elites + [Scored(c, f) for c, f in zip(children, values)], len(set(texts))


# How many times a child over its niche's cap is bred again, then how many random individuals
# are tried, before one is taken whatever its niche (a grammar may have too few structures).
NICHE_TRIES = 20


def _within_cap(child: Individual, breed: Callable[[], Individual], niches: Counter,
                grammar: Grammar, config: EvolutionConfig, rng: random.Random) -> Individual:
    """``child``, or a replacement whose structural niche has room; counts it in ``niches``."""
    def room(c: Individual) -> bool:
        return niches[structure_key(c.phenotype)] < config.niche_cap

    tries = 0
    while not room(child) and tries < NICHE_TRIES:
        child, tries = breed(), tries + 1
    tries = 0
    while not room(child) and tries < NICHE_TRIES:
        child, tries = initialise(grammar, rng, config.min_depth, config.max_depth), tries + 1
    niches[structure_key(child.phenotype)] += 1
    return child


def _restart(grammar: Grammar, config: EvolutionConfig, generation: int,
             population: list[Scored], history: list[GenerationRecord],
             fitness: FitnessFunction) -> tuple[list[Scored], int]:
    """The hall of fame (kept with its fitness, not evaluated again) and fresh random
    individuals: what a stagnant run continues from."""
    rng = _generation_rng(config, generation)
    known = {s.individual.phenotype: s.individual for s in population}
    fame = hall_of_fame(grammar, [(r.phenotypes, r.fitness) for r in history],
                        max(1, config.population // 4), config.max_depth, known)
    kept = [Scored(individual, value) for individual, value in fame]
    fresh: list[Individual] = []
    while len(kept) + len(fresh) < config.population:
        fresh.append(initialise(grammar, rng, config.min_depth, config.max_depth))
    texts = [c.phenotype for c in fresh]
    values = _evaluate(texts, fitness)
    return kept + [Scored(c, f) for c, f in zip(fresh, values)], len(set(texts))


def _refine(grammar: Grammar, config: EvolutionConfig, generation: int,
            population: list[Scored], fitness: FitnessFunction, refined: set[str]) -> int:
    """Put refined variants in their originals' places in ``population``; the number of texts
    the refinement sent to ``fitness``. A no-op when refine_constants is off."""
    if not config.refine_constants:
        return 0
    rng = random.Random(f"autolr.evolve/{config.seed}/{generation}/refine")
    better, sent = refine(grammar, [(s.individual, s.fitness) for s in population],
                          config.refine_constants, refined,
                          lambda texts: _evaluate(texts, fitness), rng, config.max_depth)
    for index, (individual, value) in better.items():
        population[index] = Scored(individual, value)
    return sent


def _tournament(population: list[Scored], size: int, rng: random.Random) -> Scored:
    """Best of ``size`` distinct random entrants; ties go to the earlier one in the population."""
    entrants = sorted(rng.sample(range(len(population)), size))
    return population[max(entrants, key=lambda i: (population[i].fitness, -i))]


def _evaluate(texts: list[str], fitness: FitnessFunction) -> list[float]:
    """Fitness for every text, each distinct text sent once, values placed by index."""
    unique = list(dict.fromkeys(texts))
    raw = list(fitness(unique))
    values: list[float | None] = [None] * len(unique)
    pairs = bool(raw) and all(isinstance(r, (tuple, list)) for r in raw)
    if pairs:
        for item in raw:
            index = _index(item, len(unique))
            if values[index] is not None:
                raise ValueError(f"fitness function returned index {index} twice")
            values[index] = _checked(item[1], unique[index])
    else:
        if len(raw) != len(unique):
            raise ValueError(f"fitness function returned {len(raw)} values for a batch of "
                             f"{len(unique)}; return one per text, or (index, fitness) pairs")
        values = [_checked(v, t) for v, t in zip(raw, unique)]
    missing = [i for i, v in enumerate(values) if v is None]
    if missing:
        raise ValueError(f"fitness function returned no value for batch indices {missing[:10]}")
    by_text = dict(zip(unique, values))
    return [by_text[t] for t in texts]


def _index(item: tuple | list, size: int) -> int:
    """The batch index of an (index, fitness) pair; numpy integers are fine, floats are not."""
    try:
        index = operator.index(item[0]) if len(item) == 2 else -1
    except TypeError:
        index = -1
    if not 0 <= index < size:
        raise ValueError(f"fitness function returned {item!r}; pairs must be "
                         f"(index, fitness) with 0 <= index < {size}")
    return index


def _checked(value: object, text: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"fitness function returned {value!r} for {text[:80]!r}; "
                         "fitness must be a number") from None
    if not math.isfinite(number):
        raise ValueError(f"fitness function returned {number} for {text[:80]!r}; fitness must "
                         "be finite: give failed candidates a low floor value instead")
    return number


def _record(generation: int, population: list[Scored], evaluated: int) -> GenerationRecord:
    values = [s.fitness for s in population]
    top = max(range(len(values)), key=lambda i: (values[i], -i))
    return GenerationRecord(
        generation=generation, phenotypes=tuple(s.individual.phenotype for s in population),
        fitness=tuple(values), best=values[top], median=float(statistics.median(values)),
        worst=min(values), best_phenotype=population[top].individual.phenotype,
        evaluated=evaluated)


def _named_seeds(seeds: Mapping[str, str] | Sequence[str]) -> list[tuple[str, str]]:
    if isinstance(seeds, str):
        raise TypeError("seeds must be a list of program texts or a {name: text} mapping, "
                        "not a single string")
    if isinstance(seeds, Mapping):
        return [(str(name), text) for name, text in seeds.items()]
    return [(f"seed {i}", text) for i, text in enumerate(seeds)]


# -- checkpoints -----------------------------------------------------------------------------

def _identity(grammar: Grammar, config: EvolutionConfig, named: list[tuple[str, str]]) -> dict:
    """What a checkpoint must match to be resumed by this call."""
    return {"config": asdict(config),
            "grammar_sha256": hashlib.sha256(grammar.text.encode()).hexdigest(),
            "seeds": [list(pair) for pair in named]}


def _after_generation(directory: Path | None, identity: dict, population: list[Scored],
                      history: list[GenerationRecord], refined: set[str],
                      on_generation: Callable[[GenerationRecord], None] | None) -> None:
    if directory is not None:
        _write_checkpoint(directory, identity, population, history, refined)
    if on_generation is not None:
        on_generation(history[-1])


def _write_checkpoint(directory: Path, identity: dict, population: list[Scored],
                      history: list[GenerationRecord], refined: set[str]) -> None:
    generation = history[-1].generation
    body = {**identity, "generation": generation,
            "population": [{"genotype": [list(g) for g in s.individual.genotype],
                            "fitness": s.fitness} for s in population],
            "history": [r.to_json() for r in history]}
    if identity["config"]["refine_constants"]:  # a run without it writes what it always did
        body["refined"] = sorted(refined)
    write_checkpoint(directory, generation, body)


def _resume_state(directory: Path, identity: dict, grammar: Grammar,
                  config: EvolutionConfig) \
        -> tuple[list[Scored], list[GenerationRecord], set[str]] | None:
    """The newest good checkpoint's population, history and refined set; None if none yet."""
    scan = newest_checkpoint(directory)
    for err in scan.refused:
        warnings.warn(f"refusing checkpoint {err}; trying the previous one", stacklevel=3)
    if scan.body is not None:
        _check_identity(scan.path, scan.body, identity)
        return _restore(scan.path, scan.body, grammar, config)
    if scan.refused:
        raise CheckpointError("no usable checkpoint in " + str(directory) + ": "
                              + "; ".join(map(str, scan.refused)))
    return None


def _check_identity(path: Path, body: dict, identity: dict) -> None:
    saved = body.get("config", {})
    for f in fields(EvolutionConfig):
        # A field added since the checkpoint was written reads as its default (the old behaviour).
        if f.name != "generations" and saved.get(f.name, f.default) != identity["config"][f.name]:
            raise CheckpointError(f"{path}: written with {f.name}={saved.get(f.name)!r}, but "
                                  f"this run has {f.name}={identity['config'][f.name]!r}; only "
                                  "generations may change when resuming")
    if body.get("grammar_sha256") != identity["grammar_sha256"]:
        raise CheckpointError(f"{path}: written with a different grammar text; resume with the "
                              "grammar file the run started with")
    if body.get("seeds") != identity["seeds"]:
        raise CheckpointError(f"{path}: written with different seed programs; resume with the "
                              "same seeds")


def _restore(path: Path, body: dict, grammar: Grammar,
             config: EvolutionConfig) -> tuple[list[Scored], list[GenerationRecord], set[str]]:
    history = [GenerationRecord.from_json(r) for r in body["history"]]
    if len(history) > config.generations:
        raise CheckpointError(f"{path}: already has {len(history)} generations, more than the "
                              f"{config.generations} asked for")
    population = []
    for member, text in zip(body["population"], history[-1].phenotypes):
        genotype = tuple(tuple(g) for g in member["genotype"])
        individual = map_genotype(grammar, genotype, config.max_depth)  # no rng: nothing random
        if individual.phenotype != text:
            raise CheckpointError(f"{path}: a genotype no longer maps to its recorded phenotype")
        population.append(Scored(individual, float(member["fitness"])))
    return population, history, set(body.get("refined", ()))
