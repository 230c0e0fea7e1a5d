"""Two mistakes of Bernoulli calls, told apart from a right call at no cost per step.

1. x out of [0, 1]: the kernels check it (validate_args) in the pass that reads x and raise one
   fixed message; here that error is re-raised naming the argument, its range and, when recon holds
   only values in [0, 1], the likely cause: recon and x swapped. Only on the error path, so reading
   the tensors' values costs nothing on a right call.
2. Probabilities passed as logits (a decoder that still ends in sigmoid): silently wrong numbers. The
   first Bernoulli call of each function in a process (the first whose tensors hold values: not under
   torch.compile tracing or torch.func transforms) reads recon's min and max once and warns
   (LogitsWarning, once) when they all lie in [0, 1]; later calls read nothing (no device sync).
   FASTELBO_LOGITS_CHECK=0, or warnings.filterwarnings("ignore", category=fastelbo.LogitsWarning),
   turns it off.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

X_RANGE_MARK = "x must lie in [0, 1]"


class LogitsWarning(UserWarning):
    """Bernoulli logits that all lie in [0, 1]: almost surely probabilities (see fastelbo._logits_check)."""


_checked: set[str] = set()


def enabled() -> bool:
    return os.environ.get("FASTELBO_LOGITS_CHECK", "1").strip().lower() not in {"0", "false", "no", "off"}


def _concrete(t: torch.Tensor) -> bool:
    """A tensor whose values can be read here (not fake, meta or wrapped by a torch.func transform)."""
    if torch.compiler.is_compiling() or t.device.type == "meta" or t.numel() == 0:
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return False
    from torch._subclasses.fake_tensor import FakeTensor

    return not isinstance(t, FakeTensor) and type(t) in (torch.Tensor, torch.nn.Parameter)


def _range(t: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        d = t.detach()
        return float(d.min()), float(d.max())


def checked(fn: str, logits: torch.Tensor, x: torch.Tensor, logits_name: str, call: Callable,
            likelihood: str = "bernoulli"):
    """call(), with the x-range error explained and the first call's logits looked at."""
    try:
        out = call()
    except ValueError as exc:
        if X_RANGE_MARK not in str(exc) or not (_concrete(x) and _concrete(logits)):
            raise
        raise ValueError(x_range_message(fn, logits, x, logits_name)) from None
    # After the first call of fn only the set lookup runs: cheapest test first.
    if (fn not in _checked and likelihood == "bernoulli" and not torch.compiler.is_compiling() and enabled()
            and _concrete(logits)):
        _checked.add(fn)
        lo, hi = _range(logits)
        if 0.0 <= lo and hi <= 1.0:
            warnings.warn(
                f"{fn}: every value of {logits_name} (the Bernoulli logits) lies in [0, 1] (min {lo:.3g}, max "
                f"{hi:.3g}): these look like probabilities, e.g. from a decoder that ends in sigmoid. fastelbo "
                f"applies the sigmoid itself: pass the output before the sigmoid. Checked on the first call "
                f"only; FASTELBO_LOGITS_CHECK=0 turns the check off.", LogitsWarning, stacklevel=3)
    return out


def x_range_message(fn: str, logits: torch.Tensor, x: torch.Tensor, logits_name: str) -> str:
    x_lo, x_hi = _range(x)
    msg = (f"{fn}: x (the data, argument 2 of {fn}({logits_name}, x, ...)) must lie in [0, 1] for the Bernoulli "
           f"likelihood; it holds values from {x_lo:.4g} to {x_hi:.4g}.")
    r_lo, r_hi = _range(logits)
    if 0.0 <= r_lo and r_hi <= 1.0:
        binary = bool(((logits == 0) | (logits == 1)).all())
        held = "only 0s and 1s" if binary else f"values in [0, 1] ({r_lo:.4g} to {r_hi:.4g})"
        msg += (f" {logits_name} holds {held}, like data: the two look swapped. fastelbo's order is "
                f"{fn}({logits_name}, x, ...), the model's output first (fastelbo 0.1's elbo took (x, recon)); "
                f"pass {logits_name}= and x= by keyword to be sure.")
    else:
        msg += (" Scale the data to [0, 1] (e.g. pixels / 255), or use likelihood='gaussian' for real-valued "
                "data.")
    return msg
