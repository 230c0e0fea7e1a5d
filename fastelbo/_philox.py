"""The noise of docs/design.md §3 in plain torch: the reference the kernels are held to.

Element n of a sampled tensor (row-major) is lane n % 4 of the four normals
that Philox4x32-10 gives for counter group n // 4, exactly as Triton's
tl.randn4x: counter (lo32(g), hi32(g), 0, 0), key (lo32(seed), hi32(seed)),
uniforms float32(int32 bits, negatives flipped by ~) * 4.6566127342e-10,
Box-Muller on lanes (0, 1) and (2, 3). The uniforms are exact float32 values;
Box-Muller runs in float64 for float64 results, float32 otherwise.

uint32 arithmetic is done in int64 tensors: products of two uint32 wrap mod
2^64, which keeps both 32-bit halves exact.
"""

from __future__ import annotations

import torch

from ._dtypes import acc_dtype

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    p = a * b
    return (p >> 32) & _M32, p & _M32


def philox4x32_10(groups: torch.Tensor, seed) -> list[torch.Tensor]:
    """Four uint32 words (in int64 tensors) per counter group; seed: int or int64 tensor."""
    c0, c1 = groups & _M32, (groups >> 32) & _M32
    c2 = torch.zeros_like(groups)
    c3 = torch.zeros_like(groups)
    k0, k1 = seed & _M32, (seed >> 32) & _M32  # two's complement bits of an int or an int64 tensor
    for _ in range(10):
        hi_b, lo_b = _mulhilo(c2, _ROUND_B)
        hi_a, lo_a = _mulhilo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return [c0, c1, c2, c3]


def uniform(bits: torch.Tensor) -> torch.Tensor:
    """uint32 words -> float32 in [0, 1), as tl.uint_to_uniform_float."""
    x = torch.where(bits >= 2**31, bits - 2**32, bits)
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * 4.6566127342e-10


def box_muller(u0: torch.Tensor, u1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.sqrt(-2.0 * torch.log(torch.clamp(u0, min=1.0e-7)))
    th = 6.283185307179586 * u1
    return r * torch.cos(th), r * torch.sin(th)


def _groups(n: int, device) -> torch.Tensor:
    return torch.arange((n + 3) // 4, dtype=torch.int64, device=device)


def uniforms(seed, n: int, device=None) -> torch.Tensor:
    """The float32 uniforms of logical elements [0, n)."""
    words = philox4x32_10(_groups(n, device), seed)
    return torch.stack([uniform(w) for w in words], dim=-1).reshape(-1)[:n]


def normals(seed, n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """eps of logical elements [0, n), Box-Muller in float64 for float64, float32 otherwise."""
    acc = acc_dtype(dtype)
    u = [uniform(w).to(acc) for w in philox4x32_10(_groups(n, device), seed)]
    n0, n1 = box_muller(u[0], u[1])
    n2, n3 = box_muller(u[2], u[3])
    return torch.stack([n0, n1, n2, n3], dim=-1).reshape(-1)[:n].to(dtype)
