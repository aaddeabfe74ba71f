"""charlm: a character-level language model (LSTM) on English prose that ships with Python.

The text is CPython's `pydoc_data.topics` (the interactive help's ~0.5 MB of reference prose),
part of every CPython install, so the task runs offline on a fresh machine with nothing to
download. Each example is a 32-character context and the character that follows it; the model
(embedding 24, LSTM 64, linear) predicts it, trained with next-character cross-entropy; the
metric is neg_loss (exp(-loss): the geometric-mean probability of the right character). The
text is cut in order: the first 80 % for training, then 10 % validation, 10 % test.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.tasks.supervised import SupervisedTask

CONTEXT = 32
VOCAB = 97  # printable ASCII (95), newline, and one class for everything else
_SIZES = {"train": 6000, "val": 1000, "test": 1000}


def _encode(text: str) -> torch.Tensor:
    codes = [(ord(c) - 32 if 32 <= ord(c) < 127 else 95 if c == "\n" else 96) for c in text]
    return torch.tensor(codes, dtype=torch.long)


def load() -> dict:
    from pydoc_data.topics import topics

    codes = _encode("\n".join(topics[k] for k in sorted(topics)))
    n = len(codes)
    bounds = {"train": (0, int(0.8 * n)), "val": (int(0.8 * n), int(0.9 * n)),
              "test": (int(0.9 * n), n)}
    out = {}
    for name, (lo, hi) in bounds.items():
        count = _SIZES[name]
        starts = torch.linspace(lo, hi - CONTEXT - 1, count).long()  # evenly spread windows
        windows = codes[starts[:, None] + torch.arange(CONTEXT + 1)]
        out[name] = (windows[:, :-1].contiguous(), windows[:, -1].contiguous())
    return out


class CharLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 24)
        self.lstm = nn.LSTM(24, 64, batch_first=True)
        self.head = nn.Linear(64, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out[:, -1])


def build() -> nn.Module:
    return CharLSTM()


def task() -> SupervisedTask:
    return SupervisedTask(name="charlm", data=load, model=build, loss="cross_entropy",
                          metric="neg_loss", batch_size=64, epochs=6, patience=2)
