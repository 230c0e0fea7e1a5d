"""Where the 64-bit Philox seed of a sample comes from (docs/design.md §3)."""

from __future__ import annotations

import numbers

import torch

_INT64_MIN, _UINT64_END = -(2**63), 2**64


def seed_tensor(device: torch.device, generator: torch.Generator | None = None, seed=None) -> torch.Tensor:
    """A 0-dim int64 tensor on `device`.

    An explicit `seed` (an integer, numpy's too, or a one-element integer tensor) is used as is;
    otherwise one is drawn from `generator` (the default generator of the
    device when None), so torch.manual_seed makes samples reproducible.
    The seed travels with the op's inputs: a recomputed forward (activation
    checkpointing) and the backward see the same noise.
    """
    if seed is not None:
        if generator is not None:
            raise ValueError("rsample: pass either seed= or generator=, not both")
        if isinstance(seed, torch.Tensor):
            if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype == torch.bool:
                raise ValueError(f"seed must be an int or a one-element integer tensor; got {seed.dtype} "
                                 f"with shape {tuple(seed.shape)}")
            return seed.reshape(()).to(device=device, dtype=torch.int64)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):  # numpy integers too
            raise TypeError(f"seed must be an int or a one-element integer tensor; got {type(seed).__name__}")
        seed = int(seed)
        if not _INT64_MIN <= seed < _UINT64_END:
            raise ValueError(f"seed must fit in 64 bits; got {seed}")
        if seed >= 2**63:
            seed -= 2**64  # same 64 bits, as int64
        return torch.tensor(seed, dtype=torch.int64, device=device)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
        if generator.device.type != torch.device(device).type:
            raise ValueError(f"generator is on {generator.device} but the tensors are on {device}")
        return torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device=generator.device, generator=generator)
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device=device)
