"""A worker for the evaluator that misbehaves on purpose, keyed by a constant in the program."""

import ctypes
import os
import time

from engine.fitness.evaluator import Job, train
from engine.tasks.protocol import EvalResult

RAISES, HANGS, EXITS, SEGFAULTS = "0.123", "0.456", "0.789", "0.321"


def faulty_train(job: Job) -> EvalResult:
    text = str(job.program)
    if RAISES in text:
        raise RuntimeError("boom from a candidate")
    if HANGS in text:
        time.sleep(3600)
    if EXITS in text:
        os._exit(3)
    if SEGFAULTS in text:
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return train(job)
