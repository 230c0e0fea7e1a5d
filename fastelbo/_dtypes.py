"""The dtype rules every layer shares, once (docs/design.md §2): the dtypes the ops take,
the accumulation dtype of each, and the dtypes torch.autocast may mix. A leaf module: torch only,
so the reference, the registry and the kernels can all import it."""

from __future__ import annotations

import torch

#: The floating dtypes every op takes (results in the inputs' dtype).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: The dtypes autocast mixes; fastelbo accepts a mix of these inside autocast (fastelbo/_autocast.py).
AUTOCAST_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of a floating dtype: float64 for float64, float32 otherwise
    (csrc/checks.h acc_dtype, acc_t<T> of csrc/fastelbo_math.h, _math.acc of the Triton kernels)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
