"""``fastelbo demo``: train a small VAE on scikit-learn's handwritten digits
twice from the same seed, once with fastelbo's fused loss and sampler and once
with the reference (torch.distributions, same Philox noise), and show that the
two learning curves agree. A third run in plain PyTorch (torch.randn noise,
torch.distributions loss: what a user has before adopting fastelbo) is timed
alongside, as the honest speed baseline.

Prints a progress bar (on a terminal), per-epoch train/test ELBO and time of
the runs, the final test ELBO and IWAE log-likelihood (K=64), and the largest
difference between the fastelbo and reference curves, the fastelbo run's
diagnostics (fastelbo.diagnostics: KL per latent dimension, active units, the
posterior gap IWAE - ELBO); writes demo.png and demo.json to --out.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
import warnings

import torch

from .. import __version__, _demo, diagnostics
from .._backend import FallbackWarning, available, resolve
from .._config import BACKENDS
from .._validate import LIKELIHOODS
from ._common import cuda_present, error, one_line

NAME = "demo"
DEVICES = ("cpu", "cuda")


def add_arguments(parser) -> None:
    # Choices are checked in run(), so that a bad value is one line on stderr (argparse prints its usage too).
    parser.add_argument("--epochs", type=int, default=50, help="training epochs (default 50)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    parser.add_argument("--latent", type=int, default=8, help="latent dimensions (default 8)")
    parser.add_argument("--likelihood", default="bernoulli", metavar="{bernoulli,gaussian}",
                        help="bernoulli: binarized digits, decoder gives logits (default); "
                             "gaussian: intensities in [0, 1], learned observation variance")
    parser.add_argument("--device", default="cpu", metavar="{cpu,cuda}", help="where to train (default cpu)")
    parser.add_argument("--backend", default="auto", metavar="{" + ",".join(BACKENDS) + "}",
                        help="fastelbo backend of the fused run (default auto); the reference run always uses "
                             "'reference'")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="CPU threads of torch during the demo (default 1: the model is too small to gain from "
                             "more, and spinning threads slow it down when the cores are busy)")
    parser.add_argument("--compile", action="store_true", help="wrap the models in torch.compile")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, data order and noise (default 0)")
    parser.add_argument("--subset", type=int, default=None, metavar="N",
                        help="use only the first N of the 1,797 digits (quick tests)")
    parser.add_argument("--out", default="fastelbo-demo", metavar="DIR",
                        help="where demo.png and demo.json go (default ./fastelbo-demo)")


class _Bar:
    """A plain-text progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, total_epochs: int, width: int = 30):
        self.enabled = sys.stderr.isatty()
        self.total_epochs, self.width, self.last = total_epochs, width, 0.0

    def update(self, epoch: int, label: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (done < total and now - self.last < 0.1):
            return
        self.last = now
        filled = int(self.width * done / total)
        sys.stderr.write(f"\repoch {epoch}/{self.total_epochs} {label:<9} "
                         f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} batches")
        sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _check_args(args) -> str | None:
    """The one-line message for a bad argument, or None."""
    for name in ("epochs", "batch_size", "latent", "threads"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}"
    if args.subset is not None and args.subset < 2:
        return f"--subset must be at least 2 (one train and one test image); got {args.subset}"
    if args.likelihood not in LIKELIHOODS:
        return f"unknown likelihood {args.likelihood!r}; choose one of: {', '.join(LIKELIHOODS)}"
    if args.backend not in BACKENDS:
        return f"unknown backend {args.backend!r}; choose one of: {', '.join(BACKENDS)}"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICES:
        return f"unknown device {args.device!r}; choose one of: {', '.join(DEVICES)}"
    if device.type == "cuda" and not cuda_present():
        return f"--device {args.device}: no CUDA device here (torch.cuda.is_available() is False); use --device cpu"
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return f"--device {args.device}: there are {torch.cuda.device_count()} CUDA devices here"
    if args.backend not in ("auto", "reference"):
        ok, why = available(args.backend, device.type)
        if not ok:
            return f"backend {args.backend!r} cannot run on {device.type} here: {one_line(why)}"
    return None


def _resolve(backend: str, device_type: str) -> tuple[str, str]:
    """(backend that runs the fused run, a note when it is not a fused one)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FallbackWarning)
        name = resolve(backend, device_type)
    note = one_line(str(caught[0].message)) if caught else ""
    if name == "reference" and not note:
        note = "the fused run uses the reference backend too: the two runs are the same computation"
    return name, note


def _speed(ratio: float) -> str:
    """other time / fastelbo time, in words."""
    if not math.isfinite(ratio) or ratio <= 0:
        return "n/a"
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def run(args) -> int:
    message = _check_args(args)
    if message:
        return error(NAME, message)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        return error(NAME, f"{exc.name} is missing; install the demo extra: pip install 'fastelbo[demo]'")
    try:
        used, note = _resolve(args.backend, torch.device(args.device).type)
    except (RuntimeError, ValueError) as exc:
        return error(NAME, one_line(str(exc)))

    device = torch.device(args.device)
    x_train, x_test = _demo.load_data(args.likelihood, args.subset)
    x_train, x_test = x_train.to(device), x_test.to(device)
    where = str(device)
    if device.type == "cpu":
        where += f" ({args.threads} thread{'s' if args.threads > 1 else ''})"
    print(f"fastelbo {__version__} demo: VAE (64-{_demo.HIDDEN}-{args.latent}) on scikit-learn digits, "
          f"{len(x_train)} train / {len(x_test)} test images, {args.likelihood} likelihood, "
          f"{args.epochs} epoch{'s' if args.epochs > 1 else ''} of batch {args.batch_size}, device {where}"
          f"{', torch.compile' if args.compile else ''}")
    print(f"three runs from seed {args.seed}, same initial weights and data order:")
    print(f"  fastelbo   ELBOLoss + rsample, backend {used!r}, fastelbo's Philox noise")
    print("  reference  backend 'reference' (torch.distributions), the same noise: same curve up to float32 rounding")
    print("  pytorch    plain PyTorch (torch.randn noise, torch.distributions loss): the speed baseline")
    if note:
        print(f"note: {note}")

    common = dict(seed=args.seed, latent=args.latent, likelihood=args.likelihood, device=device, compile=args.compile)
    fused = _demo.make_run("fastelbo", args.backend, **common)
    ref = _demo.make_run("reference", "reference", **common)
    plain = _demo.make_run("pytorch", _demo.PYTORCH, **common)
    runs = [fused, ref, plain]
    eval_seed = args.seed + 1000
    bar = _Bar(args.epochs)
    print(f"{'':5}  {'train ELBO':^20}  {'test ELBO':^20}  {'time per epoch':^29}")
    header = f"{'epoch':>5}  {'fastelbo':>9} {'reference':>10}  {'fastelbo':>9} {'reference':>10}  " \
             f"{'fastelbo':>9} {'reference':>9} {'pytorch':>9}"
    print(header)
    print("-" * len(header))
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        # the runs take turns, epoch by epoch, in rotating order, so that load from other processes and
        # cache warmth hit all of them alike
        k = epoch % len(runs)
        for r in runs[k:] + runs[:k]:
            train, seconds = _demo.train_epoch(
                r, x_train, args.batch_size, on_batch=lambda d, t, r=r: bar.update(epoch, r.name, d, t))
            r.train_elbo.append(train)
            r.epoch_time.append(seconds)
            r.test_elbo.append(_demo.test_elbo(r, x_test, eval_seed))
        bar.clear()
        print(f"{epoch:>5}  {fused.train_elbo[-1]:>9.4f} {ref.train_elbo[-1]:>10.4f}  "
              f"{fused.test_elbo[-1]:>9.4f} {ref.test_elbo[-1]:>10.4f}  "
              + " ".join(f"{_fmt_time(r.epoch_time[-1]):>9}" for r in runs), flush=True)

    iwae = {r.name: _demo.iwae_log_likelihood(r.model, x_test, r.backend, seed=eval_seed + 1) for r in runs}
    diff_train = max(abs(a - b) for a, b in zip(fused.train_elbo, ref.train_elbo))
    diff_test = max(abs(a - b) for a, b in zip(fused.test_elbo, ref.test_elbo))
    first = max(abs(fused.train_elbo[0] - ref.train_elbo[0]), abs(fused.test_elbo[0] - ref.test_elbo[0]))
    # the first epoch of a compiled run includes compilation: leave it out of the medians when there are others
    timed = slice(1, None) if args.compile and args.epochs > 1 else slice(None)
    med = {r.name: statistics.median(r.epoch_time[timed]) for r in runs}
    speedup = {r.name: med[r.name] / med["fastelbo"] if med["fastelbo"] > 0 else math.nan for r in runs}

    print()
    print(f"{'after ' + str(args.epochs) + ' epochs':<26} {'fastelbo':>9} {'reference':>10} {'|diff|':>9} "
          f"{'pytorch':>9}")
    print(f"{'test ELBO (nats/image)':<26} {fused.test_elbo[-1]:>9.4f} {ref.test_elbo[-1]:>10.4f} "
          f"{abs(fused.test_elbo[-1] - ref.test_elbo[-1]):>9.2e} {plain.test_elbo[-1]:>9.4f}")
    print(f"{'test log p(x), IWAE K=' + str(_demo.IWAE_K):<26} {iwae['fastelbo']:>9.4f} {iwae['reference']:>10.4f} "
          f"{abs(iwae['fastelbo'] - iwae['reference']):>9.2e} {iwae['pytorch']:>9.4f}")
    print(f"{'time per epoch (median)':<26} {_fmt_time(med['fastelbo']):>9} {_fmt_time(med['reference']):>10} "
          f"{'':>9} {_fmt_time(med['pytorch']):>9}")
    print(f"max |fastelbo - reference| over all epochs: train ELBO {diff_train:.2e}, test ELBO {diff_test:.2e} nats")
    if max(diff_train, diff_test) > 100 * max(first, 1e-6):
        print(f"note: the runs agree to {first:.1e} after epoch 1 (float32 rounding); the gap grows as training "
              "amplifies last-bit differences, as it would a 1-ulp change to one weight of the reference")
    diag = _demo.diagnose(fused.model, x_test, fused.backend, seed=eval_seed + 2)
    print(f"diagnostics of the fastelbo run on the test set: {diag['active_units']} of {diag['latent']} latent "
          f"dimensions active (Burda et al. 2016: Var_x(mu_j) > {diagnostics.ACTIVE_THRESHOLD}); KL per dimension "
          "(batch mean, nats): " + " ".join(f"{v:.2f}" for v in diag["kl_per_dim"]))
    print(f"posterior gap IWAE_{diag['posterior_gap_k']} - ELBO = {diag['posterior_gap']:.3f} "
          f"+- {diag['posterior_gap_stderr']:.3f} nats (standard error): an estimate from below of "
          "KL(q(z|x) || p(z|x)), as log p(x) = ELBO + that KL")
    print(f"time per epoch (whole training step), fastelbo vs plain PyTorch: {_speed(speedup['pytorch'])}; "
          f"vs the reference: {_speed(speedup['reference'])} (the reference draws fastelbo's Philox noise with "
          "plain torch ops, slower than torch.randn)")

    os.makedirs(args.out, exist_ok=True)
    png, js = os.path.join(args.out, "demo.png"), os.path.join(args.out, "demo.json")
    title = (f"fastelbo demo: VAE on digits, {args.likelihood}, latent {args.latent}, {args.epochs} epochs, "
             f"{device}, backend {used!r} vs reference")
    _demo.save_figure(png, fused, ref, x_test, seed=args.seed, title=title, plain=plain)
    result = {
        "fastelbo_version": __version__,
        "torch_version": torch.__version__,
        "config": {
            "epochs": args.epochs, "batch_size": args.batch_size, "latent": args.latent,
            "likelihood": args.likelihood, "device": str(device), "backend": args.backend, "backend_used": used,
            "compile": args.compile, "threads": args.threads, "seed": args.seed, "subset": args.subset,
            "n_train": len(x_train), "n_test": len(x_test), "hidden": _demo.HIDDEN, "iwae_k": _demo.IWAE_K,
        },
        "runs": {
            r.name: {
                "backend": {"fastelbo": used, "reference": "reference",
                            "pytorch": "plain PyTorch: torch.randn noise, torch.distributions loss"}[r.name],
                "train_elbo": r.train_elbo,
                "test_elbo": r.test_elbo,
                "epoch_time_s": r.epoch_time,
                "median_epoch_time_s": med[r.name],
                "final_test_elbo": r.test_elbo[-1],
                "test_iwae_log_likelihood": iwae[r.name],
            }
            for r in runs
        },
        "max_abs_diff": {  # fastelbo vs reference (the pytorch run has other noise: no numeric comparison)
            "train_elbo": diff_train,
            "test_elbo": diff_test,
            "test_iwae_log_likelihood": abs(iwae["fastelbo"] - iwae["reference"]),
        },
        "first_epoch_abs_diff": first,
        "diagnostics": diag,  # of the fastelbo run on the test set
        "speedup_over": {"reference": speedup["reference"], "pytorch": speedup["pytorch"]},
        "total_seconds": time.perf_counter() - start,
        "png": png,
    }
    with open(js, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {png} and {js}")
    return 0
