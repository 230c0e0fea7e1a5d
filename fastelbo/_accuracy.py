"""The baseline rule of fastelbo's accuracy checks, shared by ``fastelbo check`` and the test suite.

Some results cannot be exact in a low dtype in any implementation: float16/bfloat16 results, and
ill-conditioned float32 ones such as the IWAE gradients, which carry the softmax weights of
log-weights summed over Dx + 2 Dz terms (hundreds of nats: a float32 sum of them is only good to
~sqrt(Dx) ulp of its size, so the weights and every gradient are only good to ~1e-4 relative).
Such a result is judged against what plain PyTorch achieves on the same inputs in the same dtype:

    max|out - ref64| <= 2 * max|torch - ref64| + slack * max(1, max|ref64|)      (per tensor)

ref64 the float64 reference, torch the same reference computed in the result's dtype, slack one
unit of rounding of the result (which any kernel pays once; 0 where a per-value tolerance is the
floor). Only values where torch and ref64 are both finite count towards PyTorch's error: where
PyTorch overflowed or returned NaN, that is no excuse.
"""

from __future__ import annotations

import torch

#: How many times plain PyTorch's own error (against float64) a fused kernel may make.
BASELINE_FACTOR = 2.0


def baseline_bound(low: torch.Tensor, truth: torch.Tensor, slack: float, where: torch.Tensor | None = None) -> float:
    """The largest error against `truth` (the float64 reference) the rule above allows a result
    whose plain-PyTorch computation in the same dtype is `low`; `where` (optional, bool) limits the
    values that count, e.g. to those where the checked result is finite."""
    low = low.detach().to("cpu", torch.float64)
    truth = truth.detach().to("cpu", torch.float64)
    finite = torch.isfinite(truth)
    if where is not None:
        finite = finite & where.to("cpu")
    base_ok = finite & torch.isfinite(low)
    base = float((low - truth).abs()[base_ok].max()) if base_ok.any() else 0.0
    scale = max(1.0, float(truth[finite].abs().max())) if finite.any() else 1.0
    return BASELINE_FACTOR * base + slack * scale
