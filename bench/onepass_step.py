"""The training step with ELBOLoss's one-pass op against the same build's two-pass path, same process, same rounds.

    python bench/onepass_step.py [--shape 4096x784x64] [--dtype float32] [--rounds 15]

The step is `fastelbo bench --ops step`'s (rsample + ELBOLoss(Bernoulli, mean), forward and backward through
autograd.grad). "two-pass" is the same step with the one-pass route switched off (ELBOLoss._one_pass
returning None, the path of reduction="none" and of the releases before it); torch.compile of the reference
and eager run in the same interleaved rounds. Also prints each side's peak allocation during one step and
its bytes kept for backward (fastelbo.bench.measure), the copy floor of the step's [B, Dx] traffic (read
recon and x, write drecon: torch.add(out=)), and the [B, Dx] transfers of each side. CPU only.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

import fastelbo
from fastelbo import loss as loss_module
from fastelbo.bench import cases as C
from fastelbo.bench import measure as M


@contextlib.contextmanager
def two_pass():
    real = loss_module.ELBOLoss._one_pass
    loss_module.ELBOLoss._one_pass = lambda self, *a: None
    try:
        yield
    finally:
        loss_module.ELBOLoss._one_pass = real


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="4096x784x64", help="BxDxxDz")
    p.add_argument("--dtype", default="float32", choices=sorted(C.DTYPES))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--no-baselines", action="store_true", help="skip eager and torch.compile")
    args = p.parse_args(argv)
    B, Dx, Dz = (int(s) for s in args.shape.split("x"))
    fastelbo.load_kernels()
    case = C.Case("step", "fwd+bwd", C.Shape("custom", B, Dx, Dz), args.dtype)
    t = C.make_inputs(case)
    one = C.build(case, "fastelbo-cpu", t)[1]
    two_step = C.build(case, "fastelbo-cpu", t)[1]

    def two():
        with two_pass():
            return two_step()

    group = {"one-pass": one, "two-pass": two}
    if not args.no_baselines:
        C.raise_compile_limits()
        group["compile"] = C.build(case, "compile", t)[1]
        group["eager"] = C.build(case, "eager", t)[1]
    x, recon = t["x"].detach(), t["recon"].detach()
    out = torch.empty_like(recon)
    group["floor: read recon, x + write [B, Dx]"] = lambda: torch.add(recon, x, out=out)
    for fn in group.values():
        M.warm_up(fn)
    times = M.time_interleaved(group, args.rounds, 0.01)
    med = {k: M.median(v["rounds_s"]) * 1e3 for k, v in times.items()}
    r = {k: v["rounds_s"] for k, v in times.items()}
    print(f"step {args.shape} {args.dtype}, {torch.get_num_threads()} threads, {M.cpu_model()} "
          f"({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, {args.rounds} rounds")
    floor = med["floor: read recon, x + write [B, Dx]"]
    for k, ms in med.items():
        extra = ""
        if k in ("one-pass", "two-pass"):
            extra = f"  {ms / floor:5.2f}x the floor"
            if "compile" in r:
                extra += f", {M.paired_speedup(r['compile'], r[k]):5.2f}x compile, " \
                         f"{M.paired_speedup(r['eager'], r[k]):5.2f}x eager (medians of per-round ratios)"
        print(f"  {k:40s} {ms:8.3f} ms{extra}")
    print(f"  two-pass / one-pass: {M.paired_speedup(r['two-pass'], r['one-pass']):.2f}x (median of per-round ratios)")
    inputs = [t[k] for k in ("recon", "x", "mu", "logvar")]
    fwd_one = C.build(case, "fastelbo-cpu", t)[0]

    def fwd_two():
        with two_pass():
            return fwd_one()

    for name, fwd, step in (("one-pass", fwd_one, one), ("two-pass", fwd_two, two)):
        print(f"  {name}: peak during one step {M.peak_bytes(step) / 2**20:.2f} MiB, "
              f"kept for backward {M.saved_for_backward(fwd, inputs) / 2**20:.2f} MiB")
    print("  [B, Dx] transfers: one-pass 3 on the cpu backend (recon, x read, drecon written, in one sweep); "
          "two-pass 5 (recon and x read again by the backward)")


if __name__ == "__main__":
    main()
