"""fmnist-cnn: the Fashion-MNIST CNN protocol at its three sizes (the presets).

Not a `SupervisedTask`: this is the original system's ALR/DLR protocol (several trials, each on
its own chunk of the training file, and a separate fitness set; engine/tasks/protocol.py), kept
exactly so that a preset's results stay what they were. `--preset` chooses the size.
"""

from __future__ import annotations

import types
from collections.abc import Mapping

from engine.tasks.protocol import AlrProtocol, DataSpec, DlrProtocol, Task
from engine.tasks.training import ModelSpec

__all__ = ["SIZES"]

SIZES: Mapping[str, Task] = types.MappingProxyType(
    {
        # Seconds, for tests: a narrow CNN on a 1,600-image pool, a few epochs.
        "smoke": Task(
            name="smoke",
            data=DataSpec(val=200, fitness=200, chunk=600, pool=1600),
            model=ModelSpec(conv1=4, conv2=8, dense=16),
            alr=AlrProtocol(trials=2, batch_size=100, max_epochs=3, patience=2, abort_below=0.5),
            dlr=DlrProtocol(batch_size=100, max_epochs=3, patience=2, chunks=1),
        ),
        # The main job's default on a 2-core CPU: ~7 s of one-thread training for an Adam-like
        # candidate, less for a bad one (one trial, then the abort). The half-width CNN is 3x
        # cheaper per image than the reference; batch 100 gives the optimizer 30 steps an epoch.
        "quick": Task(
            name="quick",
            data=DataSpec(val=1000, fitness=2000, chunk=3000, pool=12000),
            model=ModelSpec(conv1=16, conv2=32, dense=64),
            alr=AlrProtocol(trials=2, batch_size=100, max_epochs=4, patience=2, abort_below=0.7),
            dlr=DlrProtocol(batch_size=100, max_epochs=8, patience=3, chunks=1),
        ),
        # The original protocol (docs/protocol.md, "Evaluation protocol"), for a GPU or a long
        # CPU run.
        "paper": Task(
            name="paper", data=DataSpec(), model=ModelSpec(), alr=AlrProtocol(), dlr=DlrProtocol()
        ),
    }
)
