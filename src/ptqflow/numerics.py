"""Reductions whose result does not depend on the thread count.

PyTorch sums a large tensor to one value in per-thread partial sums (one per thread, combined
at the end), so the last bits of a loss change with the number of threads, and a search that
compares such losses can pick differently on another machine. A reduction along a dimension
is split across threads by output element instead, each one summed by one thread in a fixed
order; a small one (under PyTorch's grain of 32768 elements) runs on one thread.
:func:`fixed_sum` reduces in rows of :data:`ROW` elements, then sums the row sums, repeating
until a row is left: the same order whatever the thread count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ROW = 4096  # elements summed by one thread; well under PyTorch's parallel grain


def fixed_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of every element of ``t`` (a 0-d tensor of its dtype), in an order fixed by
    ``t``'s size alone. Zero padding adds exact zeros."""
    flat = t.reshape(-1)
    while flat.numel() > ROW:
        flat = F.pad(flat, (0, -flat.numel() % ROW)).view(-1, ROW).sum(1)
    return flat.sum()
