"""Tasks: what a candidate is trained on to get its fitness.

`SupervisedTask` is the public protocol for a user's own data and model; `engine.tasks.registry`
names the built-in families and turns a reference (`mytask.py:task`) into a task.
"""

from engine.tasks.supervised import SupervisedTask, TaskError

__all__ = ["SupervisedTask", "TaskError"]
