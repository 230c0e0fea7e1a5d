"""Where the time of fastelbo's training step goes, next to what the memory traffic alone would cost.

    python bench/profile_step.py [--shape 4096x784x64] [--dtype float32] [--rounds 15]

With --dtype float16/bfloat16 the float32 step is timed in the same rounds too, and the
ratio of the two (median of per-round ratios) printed: on a host whose speed drifts
between runs, only interleaved rounds compare the dtypes (the target: bfloat16 at least
as fast as float32).

Times, interleaved in the same run (medians of rounds, fastelbo.bench.measure):
  - the step exactly as `fastelbo bench --ops step` times it (rsample + ELBOLoss(Bernoulli), forward
    and backward, through autograd);
  - each kernel of that step called straight (below the Autograd key, no Python autograd), in
    step order: rsample, elbo, elbo_backward, rsample_backward, and the two [B, Dz] gradient
    additions autograd makes for mu and logvar (they get gradients from both ops);
  - two memory floors of the [B, Dx] traffic: reading recon and x (the forward's minimum) and
    reading them plus writing drecon (the whole step's minimum, torch.add(out=), a copy-like
    kernel).
"glue" is the step minus the kernels run back to back in step order (timed beside it): Python, torch.library's autograd wrapper, the autograd
engine and the small tensors around them. CPU only; nothing here is a GPU figure.
"""

from __future__ import annotations

import argparse

import torch

import fastelbo
from fastelbo.bench import cases as C
from fastelbo.bench import measure as M


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="4096x784x64", help="BxDxxDz")
    p.add_argument("--dtype", default="float32", choices=sorted(C.DTYPES))
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    B, Dx, Dz = (int(s) for s in args.shape.split("x"))
    fastelbo.load_kernels()
    case = C.Case("step", "fwd+bwd", C.Shape("custom", B, Dx, Dz), args.dtype)
    t = C.make_inputs(case)
    x, recon, mu, lv = (t[k].detach() for k in ("x", "recon", "mu", "logvar"))
    gz = t["grad:1"]
    dt = C.DTYPES[args.dtype]
    ops = torch.ops.fastelbo
    seed = torch.tensor(12345)
    g_elbo = torch.full((B,), -1.0 / B, dtype=dt)
    a, b = torch.empty(B, Dz, dtype=dt), torch.empty(B, Dz, dtype=dt)
    out = torch.empty(B, Dx, dtype=dt)

    def below(fn):
        def call():
            with torch._C._AutoDispatchBelowAutograd():
                return fn()
        return call

    kernels = {
        "rsample": below(lambda: ops.rsample(mu, lv, seed, None, 0)),
        "elbo": below(lambda: ops.elbo(x, recon, mu, lv, None, None, None, "bernoulli", 1.0, True)),
        "elbo_backward": below(lambda: ops.elbo_backward(g_elbo, None, None, x, recon, mu, lv, None, None, None,
                                                         "bernoulli", 1.0, [False, True, True, True] + [False] * 3)),
        "rsample_backward": below(lambda: ops.rsample_backward(gz, lv, seed, None, [True, False])),
        "2 x add_ [B, Dz]": lambda: (a.add_(gz), b.add_(gz)),
    }
    floors = {
        "read recon, x": lambda: (recon.sum(), x.sum()),
        "read recon, x + write [B, Dx]": lambda: torch.add(recon, x, out=out),
    }
    step = C.build(case, "fastelbo-cpu", t)[1]
    first = {"step": step}
    if args.dtype != "float32":
        case32 = C.Case("step", "fwd+bwd", C.Shape("custom", B, Dx, Dz), "float32")
        first["float32 step"] = C.build(case32, "fastelbo-cpu", C.make_inputs(case32))[1]

    def in_sequence():
        for fn in kernels.values():
            fn()

    # Two interleaved groups: the step beside its kernels run back to back (the same traffic, so
    # neither runs on caches the other left cold), then each kernel alone beside the floors.
    med, rounds = {}, {}
    for group in ({**first, "kernels in step order": in_sequence}, {**kernels, **floors}):
        for fn in group.values():
            M.warm_up(fn)
        times = M.time_interleaved(group, args.rounds, 0.01)
        med.update({k: M.median(v["rounds_s"]) * 1e3 for k, v in times.items()})
        rounds.update({k: v["rounds_s"] for k, v in times.items()})
    total = med["step"]
    in_kernels = med["kernels in step order"]
    print(f"{args.shape} {args.dtype}, {torch.get_num_threads()} threads, {M.cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}")
    print(f"{'part of the step':34s} {'ms':>7s} {'share':>6s}")
    for k in kernels:
        print(f"  {k:32s} {med[k]:7.3f} {med[k] / total:6.0%}   (alone, repeated)")
    print(f"{'kernels in step order':34s} {in_kernels:7.3f} {in_kernels / total:6.0%}")
    print(f"{'glue (step - kernels in order)':34s} {total - in_kernels:7.3f} {(total - in_kernels) / total:6.0%}")
    print(f"{'step':34s} {total:7.3f}")
    if "float32 step" in med:
        ratio = 1.0 / M.paired_speedup(rounds["float32 step"], rounds["step"])
        print(f"{'float32 step, same rounds':34s} {med['float32 step']:7.3f}   {args.dtype} / float32 = {ratio:.2f} "
              "(median of per-round ratios)")
    print("memory floors of the [B, Dx] traffic:")
    for k in floors:
        print(f"{k:34s} {med[k]:7.3f}   step / floor {total / med[k]:.2f}x")
    print(f"elbo forward / its read floor {med['elbo'] / med['read recon, x']:.2f}x; "
          f"elbo backward / read+write floor {med['elbo_backward'] / med['read recon, x + write [B, Dx]']:.2f}x")


if __name__ == "__main__":
    main()
