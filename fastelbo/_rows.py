"""N-d tensors as the [R, D] rows the kernels read.

The kernels reduce the last dim of a [R, D] tensor per row. An N-d tensor whose
sum runs over some of its dims is read as such rows by moving the summed dims
last (in the tensor's memory order: a sum does not depend on the order of its
terms, and memory order is what lets channels_last merge into one dim without
a copy) and the kept dims first. torch.reshape makes that a view where the
strides allow it and a copy otherwise (e.g. a channel slice of a channels_last
tensor); the copy is autograd's, so gradients reach the original tensor.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


def reduced_dims(dims, ndim: int, name: str = "dims") -> tuple[int, ...]:
    """dims normalized to non-negative ints, checked like torch.sum checks them (range, no repeats).

    An empty list sums every dim, as torch.sum(t, dim=[]) does."""
    if isinstance(dims, int):
        dims = [dims]
    try:
        dims = list(dims)
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of ints; got {type(dims).__name__}") from None
    if not dims:
        return tuple(range(ndim))
    out = []
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"{name} must hold ints; got {type(d).__name__} in {dims}")
        if not -ndim <= d < ndim:
            raise ValueError(f"{name}: dim {d} is out of range for a {ndim}-D tensor (expected -{ndim} to {ndim - 1})")
        out.append(d % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} names a dim twice: {dims}")
    return tuple(out)


class Rows(NamedTuple):
    """How an N-d shape is read as [R, D] rows, and back."""

    order: tuple[int, ...]  # the permutation: kept dims (in order), then the summed dims in memory order
    kept_shape: tuple[int, ...]  # the shape of a per-row result
    rows: int
    cols: int

    def of(self, t: torch.Tensor) -> torch.Tensor:
        """t as [R, D]: a view where its strides allow, else a copy."""
        return t.permute(self.order).reshape(self.rows, self.cols)

    def result(self, r: torch.Tensor) -> torch.Tensor:
        """A per-row result [R] in the kept dims' shape."""
        return r.reshape(self.kept_shape)

    def back(self, t: torch.Tensor, shape) -> torch.Tensor:
        """An elementwise result [R, D] in the N-d `shape` it was read from (inverse permutation)."""
        permuted = t.reshape([shape[d] for d in self.order])
        return permuted.permute(tuple(sorted(range(len(self.order)), key=self.order.__getitem__)))


def rows_for(like: torch.Tensor, summed: tuple[int, ...]) -> Rows:
    """The rows that sum `like` over the dims `summed`: the summed dims in `like`'s memory order.

    Every tensor read with these rows gets the same permutation, so element [r, d] is the same
    logical element in each of them, whatever their own layouts (a tensor in another layout is
    copied by Rows.of)."""
    kept = tuple(d for d in range(like.dim()) if d not in summed)
    # Memory order: largest stride first; a size-1 dim's stride means nothing, it goes last.
    mem = sorted(summed, key=lambda d: (like.shape[d] == 1, -like.stride(d), d))
    kept_shape = tuple(like.shape[d] for d in kept)
    return Rows(kept + tuple(mem), kept_shape, math.prod(kept_shape), math.prod(like.shape[d] for d in summed))
