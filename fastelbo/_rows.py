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


class Trailing(NamedTuple):
    """[*lead, *trailing] tensors (lead: B, or K, B) as [*lead, D]: the trailing dims merged into one, in the
    memory order of one tensor, the same order for every tensor read with it (so element d of a row is one
    logical element in all of them). A view where a tensor's strides allow (contiguous, channels_last), a copy
    otherwise. Contiguous tensors take one reshape each way: the N-d path costs what [B, D] does, plus that."""

    order: tuple[int, ...]  # the trailing dims (numbered from 0) in memory order
    trailing: tuple[int, ...]  # the trailing shape
    features: int  # D, their product
    logical: bool  # memory order is the logical order: no permute

    @staticmethod
    def of(t: torch.Tensor, lead: int) -> "Trailing":
        trailing = tuple(t.shape[lead:])
        if t.is_contiguous():
            order = tuple(range(len(trailing)))
        else:
            mem = sorted(range(lead, t.dim()), key=lambda d: (t.shape[d] == 1, -t.stride(d), d))
            order = tuple(d - lead for d in mem)
        return Trailing(order, trailing, math.prod(trailing), order == tuple(range(len(trailing))))

    def __call__(self, t: torch.Tensor, lead: int) -> torch.Tensor:
        if self.logical:
            return t.reshape(t.shape[:lead] + (self.features,))
        perm = tuple(range(lead)) + tuple(lead + d for d in self.order)
        return t.permute(perm).reshape(t.shape[:lead] + (self.features,))

    def back(self, t: torch.Tensor, lead: int) -> torch.Tensor:
        """[*lead, D] (a result of rows read with this order) in the [*lead, *trailing] shape."""
        if self.logical:
            return t.reshape(t.shape[:lead] + self.trailing)
        permuted = t.reshape(t.shape[:lead] + tuple(self.trailing[d] for d in self.order))
        inverse = sorted(range(len(self.order)), key=self.order.__getitem__)
        return permuted.permute(tuple(range(lead)) + tuple(lead + i for i in inverse))

    def broadcast(self, p, name: str, like: torch.Tensor, like_name: str):
        """p (a number or a tensor broadcastable to like's [B, *trailing]) as the kernels take a per-feature
        tensor: numbers and 0-dim tensors as they are, [1, D] when p has no batch dim of its own (a copy of
        D values when p broadcasts within the trailing dims), else [B, D] (a copy unless p is like's shape).
        Autograd reduces the gradient back to p's shape."""
        if not isinstance(p, torch.Tensor) or p.dim() == 0:
            return p
        try:
            ok = torch.broadcast_shapes(p.shape, like.shape) == like.shape
        except RuntimeError:
            ok = False
        if not ok or p.dim() > like.dim():
            raise ValueError(f"{name} of shape {tuple(p.shape)} must broadcast to {like_name}'s shape "
                             f"{tuple(like.shape)}")
        full = p.reshape((1,) * (like.dim() - p.dim()) + tuple(p.shape))
        if full.shape[0] == 1:
            return self(full.expand(1, *self.trailing), 1)
        return self(full.expand(like.shape), 1)
