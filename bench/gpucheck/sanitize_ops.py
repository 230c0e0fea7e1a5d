"""Every CUDA kernel of csrc/cuda launched forward and backward: the script the
sanitizer stages run (compute-sanitizer --tool memcheck|racecheck|synccheck).

Through the public API with backend="cuda": every op family in every dtype
(float32, float64, float16, bfloat16) on odd sizes, a single element, rows
crossing the 1024-column chunk and an empty batch, each in three layouts
(contiguous; a column slice, i.e. strided rows; dense rows one element past
a 16-byte boundary, which takes the scalar fallback of the vector loads),
with every optional operand (priors, a [Dx] and a [B, Dx] observation
log-variance, K samples, given eps, validation on) and every gradient
wanted. Then, in float32 and float16, shapes that reach the launch
geometries of a GPU with 100+ SMs (reduce_kernel.h / map_kernel.h): few long
rows split across blocks and finalized, a block per row with more rows than
the grid, a warp per row, a thread per row.

Sizes: "all" (every dtype, shape and layout, then the geometries: what
memcheck runs), "sync" (float32 and float16, contiguous and misaligned, two
small shapes, then the geometries: racecheck and synccheck, which are slower
and look only at shared memory and barriers, whose code is the same in every
dtype of a vector width), "small" (every dtype, shape and layout, no
geometries: the script's own check on the CPU).

    python -m gpucheck.sanitize_ops [--sizes all|sync]   the cases on CUDA (what the sanitizer runs)
    python -m gpucheck.sanitize_ops --list-kernels K.json  the same under torch.profiler: which of csrc/cuda's
                                                         kernels were launched (every one must be)
    python -m gpucheck.sanitize_ops --device cpu --backend cpu --sizes small   the script's own check, no GPU
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
from pathlib import Path

import torch

from gpucheck.build_marks import mark_failed_builds

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SMALL = ((7, 13, 5), (1, 1, 1), (3, 1030, 3), (0, 13, 5))  # (B, Dx, Dz)
LAYOUTS = ("contiguous", "colslice", "offset1")
# (B, Dx, Dz) reaching each launch geometry on a GPU with ~132 SMs (float32 / float16).
GEOMETRY = {"split_rows": (2, 196608, 17), "block_rows": (1100, 2100, 40), "warp_rows": (40000, 130, 9),
            "thread_rows": (300000, 3, 2)}
GEOMETRY_DTYPES = (torch.float32, torch.float16)
_KERNEL = re.compile(r"FASTELBO_GLOBAL\s+void\s+(?:FASTELBO_BOUNDS\([^)]*\)\s*)?(\w+)\s*\(")


def expected_kernels() -> list[str]:
    """The __global__ functions of csrc/cuda, from the sources."""
    from fastelbo import _build

    names = set()
    for path in sorted((_build.csrc_dir() / "cuda").glob("*")):
        if path.suffix in (".cu", ".h"):
            names.update(_KERNEL.findall(path.read_text()))
    return sorted(names)


class Maker:
    def __init__(self, device: str, dtype: torch.dtype, seed: int):
        self.device, self.dtype = device, dtype
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, shape, lo=-2.0, hi=2.0, layout="contiguous", grad=True) -> torch.Tensor:
        t = (torch.rand(shape, generator=self.gen, dtype=torch.float64) * (hi - lo) + lo).to(self.dtype)
        t = _with_layout(t.to(self.device), layout) if len(shape) == 2 else t.to(self.device)
        return t.requires_grad_(grad)


def _with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    rows, cols = t.shape
    if layout == "contiguous":
        return t.contiguous()
    if layout == "colslice":  # strided rows: the row stride is larger than the row
        base = torch.zeros((rows, cols + 3), dtype=t.dtype, device=t.device)
        base[:, 1:cols + 1] = t
        return base[:, 1:cols + 1]
    if layout == "offset1":  # dense rows, one element off a 16-byte boundary
        base = torch.zeros(rows * cols + 1, dtype=t.dtype, device=t.device)
        out = base[1:].view(rows, cols)
        out.copy_(t)
        return out
    raise ValueError(layout)


def _backward(outputs, inputs) -> None:
    """Backward of sum(out * g) for every output, g not 1, into every input that wants a gradient."""
    outputs = [o for o in outputs if o.requires_grad]
    wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not outputs or not wanted:
        return
    grads = [torch.linspace(-1.5, 2.0, o.numel(), device=o.device, dtype=torch.float64).to(o.dtype).view(o.shape)
             for o in outputs]
    torch.autograd.grad(outputs, wanted, grads, allow_unused=True)


def op_cases(F, make: Maker, b: int, dx: int, dz: int, layout: str, backend: str, everything: bool = True):
    """(label, callable) of every op family at one shape and layout; each call runs forward and backward."""
    K = 3

    def rsample_seed():
        mu, lv = make((b, dz), layout=layout), make((b, dz), -1, 1, layout=layout)
        _backward([F.rsample(mu, lv, seed=1234, backend=backend)], [mu, lv])

    def rsample_k_eps():
        mu, lv = make((b, dz), layout=layout), make((b, dz), -1, 1, layout=layout)
        _backward([F.rsample(mu, lv, num_samples=K, seed=99, backend=backend)], [mu, lv])
        eps = make((b, dz), grad=False, layout=layout)
        _backward([F.rsample(mu, lv, eps=eps, backend=backend)], [mu, lv])

    def kl():
        mu, lv = make((b, dz), layout=layout), make((b, dz), -1, 1, layout=layout)
        _backward([F.gaussian_kl(mu, lv, backend=backend)], [mu, lv])
        pm, pl = make((dz,)), make((dz,), -1, 1)
        _backward([F.gaussian_kl(mu, lv, pm, pl, backend=backend)], [mu, lv, pm, pl])

    def free_bits():
        mu, lv = make((b, dz), layout=layout), make((b, dz), -1, 1, layout=layout)
        pm, pl = make((dz,)), make((dz,), -1, 1)
        _backward([F.free_bits_kl(mu, lv, 0.3, pm, pl, backend=backend)], [mu, lv, pm, pl])

    def bernoulli():
        logits, x = make((b, dx), layout=layout), make((b, dx), 0, 1, layout=layout)
        _backward([F.bernoulli_log_prob(logits, x, backend=backend, validate_args=True)], [logits, x])
        _backward([F.bernoulli_log_prob(logits, x, backend=backend, validate_args=False)], [logits])

    def gaussian():
        mean, x = make((b, dx), layout=layout), make((b, dx), layout=layout)
        for lv in (0.3, make((dx,), -1, 1), make((b, dx), -1, 1, layout=layout)):
            _backward([F.gaussian_log_prob(mean, x, lv, backend=backend)], [mean, x, lv])

    def elbo_bernoulli():
        x, recon = make((b, dx), 0, 1, layout=layout), make((b, dx), layout=layout)
        mu, lv = make((b, dz), layout=layout), make((b, dz), -1, 1, layout=layout)
        pm, pl = make((dz,)), make((dz,), -1, 1)
        t = F.elbo(recon=recon, x=x, mu=mu, logvar=lv, prior_mu=pm, prior_logvar=pl, beta=0.7, backend=backend, validate_args=True)
        _backward(list(t), [x, recon, mu, lv, pm, pl])

    def elbo_gaussian_k():
        x, obs = make((b, dx), layout=layout), make((dx,), -1, 1)
        recon = make((K, b, dx))
        mu, lv = make((b, dz), layout=layout), make((b, dz), -1, 1, layout=layout)
        t = F.elbo(recon=recon, x=x, mu=mu, logvar=lv, likelihood="gaussian", obs_logvar=obs, prior_mu=0.2, prior_logvar=-0.1,
                   backend=backend)
        _backward(list(t), [x, recon, mu, lv, obs])

    def iwae():
        for likelihood in ("bernoulli", "gaussian"):
            x = make((b, dx), 0, 1, layout=layout)
            recon, z = make((K, b, dx)), make((K, b, dz))
            mu, lv = make((b, dz), layout=layout), make((b, dz), -1, 1, layout=layout)
            obs = make((dx,), -1, 1) if likelihood == "gaussian" else None
            bound = F.iwae_bound(recon=recon, x=x, z=z, mu=mu, logvar=lv, likelihood=likelihood, obs_logvar=obs, prior_mu=0.1,
                                 backend=backend)
            _backward([bound], [x, recon, z, mu, lv, obs])

    cases = {"rsample": rsample_seed, "kl": kl, "elbo-bernoulli": elbo_bernoulli, "gaussian": gaussian}
    if everything:
        cases.update({"rsample-k-eps": rsample_k_eps, "free-bits": free_bits, "bernoulli": bernoulli,
                      "elbo-gaussian-k": elbo_gaussian_k, "iwae": iwae})
    return list(cases.items())


def all_cases(device: str, backend: str, sizes: str):
    """The cases in the order they run: float32 first, then the launch geometries, then the other dtypes, so
    that a sanitizer run stopped by its cap has covered every kernel and geometry once."""
    import fastelbo
    from fastelbo import functional as F

    sync = sizes == "sync"
    per_dtype = []
    for dtype in (GEOMETRY_DTYPES if sync else DTYPES):
        name = str(dtype).replace("torch.", "")
        cases = []
        for (b, dx, dz) in (SMALL[::2] if sync else SMALL):
            for layout in (LAYOUTS[::2] if sync else LAYOUTS):
                make = Maker(device, dtype, seed=b * 1000 + dx)
                for label, fn in op_cases(F, make, b, dx, dz, layout, backend):
                    cases.append((f"{label} {name} {b}x{dx}x{dz} {layout}", fn))

        def noise(dtype=dtype):
            seed = fastelbo._seed.seed_tensor(torch.device(device), seed=2**40 + 3)
            for n, normal in ((1, True), (4099, True), (4099, False)):
                torch.ops.fastelbo.philox_noise(seed, n, normal, dtype)

        if backend == "cuda":  # the op itself (the reference and the tests call it; no public function does)
            cases.append((f"philox_noise {name}", noise))
        per_dtype.append(cases)
    geometry = []
    if sizes in ("all", "sync"):
        for dtype in GEOMETRY_DTYPES:
            name = str(dtype).replace("torch.", "")
            for kind, (b, dx, dz) in GEOMETRY.items():
                for layout in ("contiguous", "offset1"):
                    make = Maker(device, dtype, seed=7)
                    for label, fn in op_cases(F, make, b, dx, dz, layout, backend, everything=False):
                        geometry.append((f"{label} {name} {kind} {b}x{dx}x{dz} {layout}", fn))
    return per_dtype[0] + geometry + [c for cases in per_dtype[1:] for c in cases]


def run(cases, device: str) -> int:
    failed = 0
    t0 = time.monotonic()
    for i, (label, fn) in enumerate(cases, 1):
        print(f"[{i}/{len(cases)} {time.monotonic() - t0:6.1f}s] {label}", flush=True)
        try:
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:
            failed += 1
            print(f"FAILED: {label}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(limit=3)
            if "CUDA error" in str(exc) or "cudaError" in str(exc):
                print("a CUDA error leaves the context unusable: stopping", flush=True)
                return 2
    print(f"{len(cases) - failed} of {len(cases)} cases ran in {time.monotonic() - t0:.1f} s", flush=True)
    return 1 if failed else 0


def list_kernels(cases, path: Path) -> int:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        rc = run(cases, "cuda")
    launched: dict[str, int] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA and "fastelbo::" in e.name:
            launched[e.name] = launched.get(e.name, 0) + 1
    expected = expected_kernels()
    seen = {k: sum(n for name, n in launched.items() if re.search(rf"::{k}\b", name)) for k in expected}
    missing = [k for k, n in seen.items() if n == 0]
    doc = {"expected": expected, "launches_per_kernel": seen, "missing": missing, "cases": len(cases),
           "instantiations": len(launched), "cases_rc": rc}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    for k in expected:
        print(f"  {k:22s} {seen[k]:6d} launches" + ("   NOT LAUNCHED" if k in missing else ""))
    print(f"{len(launched)} kernel instantiations of fastelbo launched; missing: {missing or 'none'}")
    return 1 if missing or rc else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="cuda")
    p.add_argument("--sizes", choices=("all", "sync", "small"), default="all")
    p.add_argument("--list-kernels", type=Path, metavar="JSON")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    mark_failed_builds()
    cases = all_cases(args.device, args.backend, args.sizes)
    if args.list_kernels:
        return list_kernels(cases, args.list_kernels)
    return run(cases, args.device)


if __name__ == "__main__":
    sys.exit(main())
