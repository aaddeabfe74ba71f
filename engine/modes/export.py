"""best_optimizer.py: the best program of a run as one file a user copies into their project.

The file must work where AutoLR is not installed, so it carries its own code instead of
importing ours: for ALR, a ``torch.optim.Optimizer`` subclass whose update is the code our own
emitters generate for the program (the torch backend's elementwise ops, and the Numba backend's
fused loop, used on CPU float32 tensors when numba imports); for DLR, the schedule as a Python
function and an ``LRScheduler`` that applies it once per epoch. Generating the optimizer from
the same emitters that the evaluation ran keeps the two from drifting apart; the tests train a
model with the file and with ``kernels.EvolvedOptimizer`` and compare.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from codegen.backends import numba as numba_emit
from codegen.backends import torch as torch_emit
from codegen.ir import (COMPARISON_SYMBOLS, STATES, Call, Const, Node, Program, Schedule,
                        UniformStepper, Var)
from codegen.lower import lower
from engine import modes
from engine.modes import Mode

__all__ = ["render_alr", "render_dlr", "write_best_optimizer"]


def write_best_optimizer(path: str | Path, mode: str | Mode, text: str, *, about: str,
                         lr: float = 1.0) -> Path:
    """Write the standalone file for ``text`` (a program or schedule); ``about`` is a paragraph
    for its docstring (where it came from, its fitness against the baseline); ``lr`` is the ALR
    optimizer's default learning rate (1.0: the evolved step as it is)."""
    source = modes.get(mode).render(text, about, lr)
    path = Path(path)
    path.write_text(source, encoding="utf-8")
    return path


def _string_literal(text: str, *, continued: bool = False) -> str:
    """A triple-quoted Python literal whose value is exactly `text`, for text that a reader of the
    generated file sees (docstrings, the program). Text is never pasted between quotes: a run
    directory named `run\\Nx` made a `\\N` escape and a file that did not import. `repr()`
    would do for the value but writes the lines as one; so backslashes, quote runs and characters
    that are not printable are escaped, and everything else stays as written. `continued` starts
    the text on the next line (a backslash-newline adds nothing to the value)."""
    out = []
    for i, char in enumerate(text):
        if char == "\\" or char == '"' and text[i + 1:i + 2] in ('"', ""):
            out.append("\\" + char)  # a quote before a quote or the end: no run of three
        elif char == "\n" or char.isprintable():
            out.append(char)
        else:  # \r would become \n when Python reads the file; a U+2028 would split the line
            out.append(repr(char)[1:-1])
    return '"""' + ("\\\n" if continued else "") + "".join(out) + '"""'


# -- ALR: an optimizer class -------------------------------------------------------------------


def render_alr(program: Program, about: str, lr: float = 1.0) -> str:
    # The decay kernel, called with decay = 1 when there is no weight decay (x * 1 is exact):
    # one kernel in the file instead of two.
    plan = lower(program, decay=True)
    canonical = plan.program
    tensors, scalars = plan.tensor_states, plan.scalar_states
    math_lines = []
    for target in STATES + ("weight",):
        delta = getattr(canonical, target)
        if delta is not None and (target == "weight" or target in tensors + scalars):
            name = "p" if target == "weight" else target
            if target == "weight":
                math_lines.append("p     <- p * (1 - lr * weight_decay)")
                delta = delta if canonical.reads_lr else f"lr * {delta}"
            math_lines.append(f"{name:<6}<- {name} - {delta}")
    state_doc = _state_doc(tensors, scalars)
    doc = (f"The best optimizer of an AutoLR run, as a standalone torch optimizer.\n\n"
           f"{about}\n\n"
           "The update, elementwise for every parameter p with gradient g (written `grad`,\n"
           "negated under maximize=True); the states start at 0 and are updated in this order,\n"
           "each line seeing the new values of the lines above it:\n\n"
           + textwrap.indent("\n".join(math_lines), "    ") + "\n\n"
           f"{state_doc}\n\n"
           "The program (AutoLR's text form, canonical):\n\n"
           + textwrap.indent(str(canonical), "    ") + "\n\n"
           "The math is float32 (float64 for float64 parameters; float16/bfloat16 parameters\n"
           "are widened to float32 and rounded back once per step, their states float32).\n"
           "Needs only torch. Where numba imports, CPU float32 parameters are updated by one\n"
           "fused Numba loop per parameter (the kernel AutoLR evaluated the program with);\n"
           "elsewhere by the same math in torch ops, on any device.\n\n"
           "Usage::\n\n"
           "    from best_optimizer import BestOptimizer\n"
           "    optimizer = BestOptimizer(model.parameters())\n"
           "    ...; loss.backward(); optimizer.step(); optimizer.zero_grad()\n")
    torch_kernel = _function_from(torch_emit.emit(plan), "kernel", "_torch_update")
    numba_kernel = _function_from(numba_emit.emit(plan), "kernel", "_numba_update",
                                  decorated=True)
    numba_kernel = numba_kernel.replace("cache=True", "cache=_CACHE")
    prelude = "\n".join(line for line in numba_emit.PRELUDE.splitlines()
                         if not line.startswith(("import ", "from ")))  # imported above
    advance = _advance_function(canonical.stepper())
    params = ", ".join(["weight", "grad", *tensors, "lr", *scalars])
    return TEMPLATE_ALR.format(
        doc=_string_literal(doc),
        program=_string_literal(f"{canonical}\n", continued=True),
        tensors=repr(tensors),
        scalars=repr(scalars),
        torch_kernel=torch_kernel,
        numba_helpers=textwrap.indent(prelude.strip() + "\n\n\n" + numba_kernel.strip(), "    "),
        advance=advance,
        params=params,
        lr=float(lr),
    )


def _state_doc(tensors: tuple[str, ...], scalars: tuple[str, ...]) -> str:
    parts = []
    if tensors:
        parts.append(f"State tensors (same shape as the parameter): {', '.join(tensors)}.")
    if scalars:
        parts.append(f"Uniform states (one number per parameter, like Adam's step count): "
                     f"{', '.join(scalars)}.")
    if not parts:
        parts.append("No state: the update reads only the gradient.")
    parts.append("`lr` is the constructor's lr (default DEFAULT_LR); a program that never reads it "
                 "has its\nweight update scaled by it, so LR schedulers drive every program.")
    return "\n".join(parts)


def _function_from(module: str, name: str, new_name: str, decorated: bool = False) -> str:
    """The top-level function `name` of generated module text (with its decorator), renamed."""
    lines = module.splitlines()
    definition = next(i for i, line in enumerate(lines) if line.startswith(f"def {name}("))
    start = definition - 1 if decorated and lines[definition - 1].startswith("@") else definition
    end = definition + 1
    while end < len(lines) and (not lines[end] or lines[end].startswith((" ", "\t"))):
        end += 1
    body = "\n".join(lines[start:end]).rstrip()
    return body.replace(f"def {name}(", f"def {new_name}(", 1)


def _advance_function(stepper: UniformStepper) -> str:
    """`stepper` as torch code in float32 like the kernels' host side: `_advance(lr, *old) ->
    new` (a tuple, in the kernel's scalar-state order)."""
    scalars = stepper.states
    if not scalars:
        return "def _advance(lr):\n    return ()\n"
    lines = [f"def _advance(lr, {', '.join(scalars)}):",
             "    # One step of the uniform states, in float32 (0-d tensors), as AutoLR's host side.",
             "    f32 = _f32",
             "    lr = f32(lr)"]
    lines += [f"    {s} = f32({s})" for s in scalars]
    lines += [f"    {s} = torch.sub({s}, {_torch_expr(delta)})" for s, delta in stepper.deltas]
    lines.append(f"    return ({', '.join(f'float({s})' for s in scalars)},)")
    return "\n".join(lines) + "\n"


def _torch_expr(node: Node) -> str:
    if isinstance(node, Const):
        return f"f32({node.value!r})"
    if isinstance(node, Var):
        return node.name
    assert isinstance(node, Call)
    return torch_emit.TEMPLATES[node.op].format(*(_torch_expr(a) for a in node.args))


TEMPLATE_ALR = '''\
{doc}

from __future__ import annotations

import torch

__all__ = ["BestOptimizer", "DEFAULT_LR", "PROGRAM"]

PROGRAM = {program}
TENSOR_STATES = {tensors}
SCALAR_STATES = {scalars}
DEFAULT_LR = {lr!r}


def _f32(value):
    return torch.tensor(value, dtype=torch.float32)


# -- the update in torch ops (any device); generated by AutoLR's torch emitter -----------------

{torch_kernel}


# -- the uniform states (step counters), advanced on the host -----------------------------------

{advance}

# -- the same update as one fused Numba loop over flat float32 arrays (CPU) ----------------------

try:
    import numba
    import numpy as np
    from numpy import float32 as f32
except ImportError:  # numba is optional: torch ops do the same math
    numba = None

_CACHE = "__file__" in globals()  # numba caches compiled code next to a file, not in a notebook

if numba is not None:
{numba_helpers}
else:
    _numba_update = None


def _flat(t):
    """A 1-D view of a dense tensor in memory order (contiguous or channels_last), else None."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).view(-1)
    return None


class BestOptimizer(torch.optim.Optimizer):
    """The evolved update (see the module docstring) as a torch optimizer.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr: the learning rate, kept in ``param_groups[i]['lr']`` so LR schedulers drive it. A
            program that reads `lr` uses it where it reads it; one that never reads it has its
            weight update scaled by it (DEFAULT_LR: the step AutoLR evaluated).
        weight_decay: decoupled weight decay, as torch.optim.AdamW's: ``p *= 1 - lr *
            weight_decay`` before the update.
        maximize: maximize the objective (the gradient negated), as torch's ``maximize``.
        backend: "auto" (numba for CPU float32 tensors when numba imports, else torch ops),
            "numba" or "torch".
    """

    def __init__(self, params, lr: float = DEFAULT_LR, weight_decay: float = 0.0,
                 maximize: bool = False, backend: str = "auto"):
        if not 0.0 <= lr < float("inf"):
            raise ValueError(f"invalid learning rate: {{lr}}")
        if not 0.0 <= weight_decay < float("inf"):
            raise ValueError(f"invalid weight_decay value: {{weight_decay}}")
        if not isinstance(maximize, bool):
            raise ValueError(f"maximize must be True or False, not {{maximize!r}}")
        if backend not in ("auto", "numba", "torch"):
            raise ValueError(f"backend must be 'auto', 'numba' or 'torch', not {{backend!r}}")
        if backend == "numba" and _numba_update is None:
            raise ValueError("backend='numba' needs numba installed (pip install numba)")
        self.backend = backend
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, maximize=maximize))

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # saved by a version without these options
            group.setdefault("weight_decay", 0.0)
            group.setdefault("maximize", False)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = float(group["lr"])
            decay = 1.0 - lr * group["weight_decay"]  # exactly 1.0 without weight decay
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("BestOptimizer does not support sparse gradients")
                grad = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if not state:
                    real = torch.float64 if p.dtype == torch.float64 else torch.float32
                    for name in TENSOR_STATES:
                        state[name] = torch.zeros_like(p, dtype=real,
                                                       memory_format=torch.preserve_format)
                    for name in SCALAR_STATES:
                        state[name] = torch.zeros((), dtype=torch.float32)
                scalars = _advance(lr, *(float(state[name]) for name in SCALAR_STATES))
                tensors = [state[name] for name in TENSOR_STATES]
                if not self._numba_step(p, grad, tensors, lr, scalars, decay):
                    _torch_update(p, grad, *tensors, lr, *scalars, decay)
                for name, value in zip(SCALAR_STATES, scalars):
                    state[name].fill_(value)
        return loss

    def _numba_step(self, p, grad, tensors, lr, scalars, decay) -> bool:
        """Run the fused Numba loop when it applies; False to fall back to torch ops."""
        if self.backend == "torch" or _numba_update is None:
            return False
        group = [p, grad, *tensors]
        if p.device.type != "cpu" or any(t.dtype != torch.float32 or t.stride() != p.stride()
                                         for t in group):
            return False
        flat = [_flat(t) for t in group]
        if any(f is None for f in flat):
            return False
        _numba_update(*(f.detach().numpy() for f in flat), lr, *scalars, decay)
        bump = getattr(torch.autograd.graph, "increment_version", None)
        if bump is not None:  # the arrays changed behind autograd's back
            bump(p)
        return True
'''


# -- DLR: a schedule ---------------------------------------------------------------------------


def render_dlr(schedule: Schedule, about: str, lr_scale: float = 1.0) -> str:
    doc = (f"The best learning-rate schedule of an AutoLR run, as a standalone function.\n\n"
           f"{about}\n\n"
           "The schedule, `lr_next = f(epoch, lr)`, is applied at the start of every epoch (the\n"
           "first included) to the current learning rate of plain SGD started at lr=0.01:\n\n"
           f"    {schedule}\n\n"
           "Usage::\n\n"
           "    from best_optimizer import BestSchedule, INITIAL_LR\n"
           "    optimizer = torch.optim.SGD(model.parameters(), lr=INITIAL_LR)\n"
           "    scheduler = BestSchedule(optimizer)   # sets the lr for epoch 0\n"
           "    for epoch in range(epochs):\n"
           "        train_one_epoch(model, optimizer)\n"
           "        scheduler.step()                    # the lr for the next epoch\n")
    return TEMPLATE_DLR.format(doc=_string_literal(doc), text=repr(str(schedule)),
                               expr=_python_expr(schedule.expr), scale=repr(float(lr_scale)))


def _python_expr(node: Node) -> str:
    """float64 Python for a schedule expression, matching codegen.ir's evaluator."""
    if isinstance(node, Const):
        return repr(float(node.value))
    if isinstance(node, Var):
        return "float(epoch)" if node.name == "epoch" else "lr"
    assert isinstance(node, Call)
    args = [_python_expr(a) for a in node.args]
    if node.op == "if":
        cond, then, other = node.args
        a, b = (_python_expr(x) for x in cond.args)  # type: ignore[union-attr]
        symbol = COMPARISON_SYMBOLS[cond.op]  # type: ignore[union-attr]
        return f"({_python_expr(then)} if {a} {symbol} {b} else {_python_expr(other)})"
    return f"_{node.op}({', '.join(args)})"


TEMPLATE_DLR = '''\
{doc}

from __future__ import annotations

import math

import torch

__all__ = ["INITIAL_LR", "LR_SCALE", "SCHEDULE", "BestSchedule", "schedule"]

SCHEDULE = {text}
# The step size scale the run found best: every learning rate is LR_SCALE times what SCHEDULE
# gives for the unscaled ones (1.0: the schedule as written).
LR_SCALE = {scale}
INITIAL_LR = 0.01 * LR_SCALE  # the DLR protocol's plain SGD starts at 0.01, times the scale


def schedule(epoch: int, lr: float) -> float:
    """The learning rate for `epoch`, from the current one."""
    lr = lr / LR_SCALE
    return LR_SCALE * float({expr})


class BestSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Sets every group's lr to schedule(epoch, lr) at the start of each epoch: on construction
    for epoch 0, then at each ``step()`` (call it once per epoch, after the epoch)."""

    def get_lr(self):
        return [schedule(self.last_epoch, group["lr"]) for group in self.optimizer.param_groups]


# Ops an extended schedule grammar may use, with AutoLR's semantics (float64).
def _neg(a): return -a
def _add(a, b): return a + b
def _sub(a, b): return a - b
def _mul(a, b): return a * b
def _div(a, b): return 0.0 if b == 0 else a / b
def _square(a): return a * a
def _sqrt(a): return math.sqrt(a) if a >= 0 else math.nan
def _abs(a): return abs(a)
def _sign(a): return a if a != a else float((a > 0) - (a < 0))
def _exp(a): return math.exp(a) if a < 709.0 else math.inf
def _log(a): return math.log(a) if a > 0 else (-math.inf if a == 0 else math.nan)
def _min(a, b): return a if (a < b or a != a) else b
def _max(a, b): return a if (a > b or a != a) else b


def _pow(a, b):
    try:
        return math.pow(a, b)
    except (OverflowError, ValueError):
        return math.inf if abs(a) > 1 else math.nan
'''
