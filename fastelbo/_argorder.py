"""ARGUMENT ORDER: input first, target second, across the library (docs/migration.md).

fastelbo 0.1 took elbo(x, recon, ...) and iwae_bound(x, recon, z, ...) but ELBOLoss()(recon, x, ...),
bernoulli_log_prob(logits, x) and gaussian_log_prob(mean, x), like nn.BCEWithLogitsLoss()(input, target)
and torch.nn.functional. From 0.2 every function takes the model's output first: elbo(recon, x, mu,
logvar), iwae_bound(recon, x, z, mu, logvar) (fastelbo.functional and fastelbo.reference alike). The
keywords recon= and x= work in every release.

The transition (0.2): a positional call in the old order is recognised where the shapes tell the two
apart, without reading a value (no device sync): recon [K, B, Dx] against x [B, Dx] (every iwae_bound,
and elbo with K samples). Such a call is computed as meant and warns (ArgumentOrderWarning, a
FutureWarning). Two tensors of one shape cannot be told apart safely, so they are read in the new order
and the first such call in a process warns that they were; recon= / x= by keyword silence it. Behind it:
a swapped Bernoulli call feeds the targets as logits and the logits as targets, which the x range check
(validate_args, on by default) almost always stops with a message suggesting the swap, and the
logits-look-like-probabilities warning flags; a swapped Gaussian call gives the same values and
gradients (log N(x | m, s) is symmetric in x and m).
"""

from __future__ import annotations

import warnings

import torch


class ArgumentOrderWarning(FutureWarning):
    """A call of elbo / iwae_bound whose recon and x were passed positionally in the 0.1 order, or
    whose order could not be checked (see fastelbo._argorder)."""


_warned_ambiguous: set[str] = set()


def bind(fn: str, args: tuple, named: dict, names: tuple[str, ...]) -> list:
    """The values of `names` (recon, x, then the rest) from a call's positional `args` and keyword
    `named` (None where not given), as a plain signature would bind them, plus the order rules above."""
    if len(args) > len(names):
        raise TypeError(f"{fn}() takes at most {len(names)} positional arguments ({', '.join(names)}); "
                        f"got {len(args)}")
    values = []
    for i, name in enumerate(names):
        given = named.get(name)
        if i < len(args):
            if given is not None:
                raise TypeError(f"{fn}() got multiple values for argument {name!r}")
            given = args[i]
        if given is None:
            raise TypeError(f"{fn}() missing required argument {name!r} (call it as {fn}({', '.join(names)}, ...))")
        values.append(given)
    if len(args) >= 2:
        values[0], values[1] = _positional_pair(fn, args[0], args[1])
    return values


def _positional_pair(fn: str, first, second):
    """(recon, x) from the first two positional arguments."""
    if not (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)):
        return first, second  # the argument checks name what is wrong
    if second.dim() == first.dim() + 1 and tuple(second.shape[1:]) == tuple(first.shape):
        # x [B, Dx] then recon [K, B, Dx] (any trailing shape): the 0.1 order, unambiguous by shape, as
        # x never has a sample dimension.
        warnings.warn(f"{fn}(x, recon, ...) is the fastelbo 0.1 argument order; it is now {fn}(recon, x, ...), "
                      "model output first, like ELBOLoss and torch.nn.functional. This call was recognised by "
                      "its shapes and computed as meant; swap the two arguments (or pass recon= and x= by "
                      "keyword). The old order stops being recognised in fastelbo 0.3.",
                      ArgumentOrderWarning, stacklevel=4)
        return second, first
    if not torch.compiler.is_compiling() and first.dim() == second.dim() and fn not in _warned_ambiguous:
        _warned_ambiguous.add(fn)
        warnings.warn(f"{fn}: the first two arguments were read as (recon, x), the order since fastelbo 0.2 "
                      f"(0.1 took (x, recon)); two tensors of one shape cannot be told apart, so check calls "
                      f"written for 0.1. Pass recon= and x= by keyword to be explicit; this warning is shown "
                      f"once per process.", ArgumentOrderWarning, stacklevel=4)
    return first, second
