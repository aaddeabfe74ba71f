"""The evolution: the grammar and its derivations, SGE's genotypes and variation, the generational
loop with its checkpoints, seeds snapped into a grammar, diversity and structural distance."""
