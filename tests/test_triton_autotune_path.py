"""The GPU launch path of the Triton kernels, driven without a GPU.

On a GPU every launch goes launcher (kernels/_launch.py launch_rows, launch_rows_2d, launch_flat)
-> wrap_triton(tuned)[grid](*args, **constexprs) -> triton's Autotuner.run, which names the
positional arguments (nargs = dict(zip(arg_names, args))), forms the tuning key from the `key`
arguments and every tensor's dtype, calls early_config_prune(configs, nargs, **kwargs), times each
kept config, caches the fastest per key and launches it; the kernel calls grid(meta) with meta the
launch's arguments by name, the config's ROWS or BLOCK among them. Under TRITON_INTERPRET=1 the
launchers take their interpreter branch and none of this runs, which is how a prune reading an
argument the kernel does not have (rsample's backward: "N" for its "M") crashed only on GPUs.

Here the launchers take their GPU branch (_launch.INTERPRET patched to False: GPU tile sizes and slot
counts too) and go through the real Autotuner objects -- shallow copies, so that the module's own
cache stays clean, whose kernel call is recorded and whose benchmark runs each config once and
reports a made-up time instead of timing CUDA events (the winner: the first or the last config kept).
The kernels themselves still run in the interpreter (on a GPU: compiled), so the op results under
every launch path are checked against fastelbo.reference with the accuracy suite's harness. Each
launch is also checked for what only the GPU path decides:

  * the prune keeps a non-empty subset of the configs, within the tile budget (16 elements per
    thread per operand for the row kernels, 8 for float64 and for the flat Philox kernels), and no
    BLOCK absurdly larger than the problem;
  * the prune depends on the tuning key only (and on the launcher's constexprs, themselves functions
    of it): the autotuner keeps one choice per key, so anything else would make the first launch's
    choice stick; every key names an argument and shows up in the key the autotuner formed;
  * torch.compile's own prune (TritonHOPifier.do_prune_configs, what a traced launch runs) keeps the
    same configs;
  * every grid the autotuner launched covers every row (and column chunk, or flat element) exactly
    once, for 1, 7 and 4096 rows and odd D (these sizes without running the kernels).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import triton
from triton.runtime.autotuner import Autotuner

from cases import Api, _forward_backward, bernoulli_case, gaussian_case, kl_case, rsample_case, run
from fastelbo import _backend, _validate
from fastelbo.kernels import KERNELS, _launch, elbo, free_bits, iwae, kl, loglik, rsample
from helpers import Backend, backend_device, generator_for
from test_bounds import elbo_k_case, free_bits_case, iwae_case, rsample_k_case

DEVICE = backend_device("triton")
TRITON_OK, TRITON_WHY = _backend.available("triton", DEVICE)
pytestmark = pytest.mark.skipif(not TRITON_OK, reason=f"backend 'triton' on {DEVICE}: {TRITON_WHY}")
TRITON = Backend("triton", DEVICE)

KERNEL_MODULES = (rsample, kl, loglik, elbo, iwae, free_bits)
LAUNCHERS = ("launch_rows", "launch_rows_2d", "launch_flat")
AUTOTUNER_ATTRS = ("fn", "arg_names", "keys", "configs", "cache", "early_config_prune", "prune_configs")
COLUMN_SIZE = {"BLOCK": "D", "BLOCK_X": "DX", "BLOCK_Z": "DZ"}  # a row kernel's column-block constexpr: its size


def _kernel_name(fn) -> str:
    names = [name for name, k in KERNELS.items() if k is fn]
    assert len(names) == 1, f"{fn} is not one kernel of fastelbo.kernels.KERNELS"
    return names[0]


def tuned_kernels() -> dict:
    """KERNELS name -> (module, attribute) of every autotuned launcher object in kernels/*.py."""
    out = {}
    for module in KERNEL_MODULES:
        for attr, obj in vars(module).items():
            if isinstance(obj, Autotuner):
                out[_kernel_name(obj.fn)] = (module, attr)
    return out


TUNED = tuned_kernels()  # before any test patches the modules


def _require_autotuner_api(tuned) -> None:
    missing = [a for a in AUTOTUNER_ATTRS if not hasattr(tuned, a)]
    if missing:
        pytest.skip(f"triton {triton.__version__}: its Autotuner has no {missing}, which this test drives")


# ---------------------------------------------------------------------------
# Recording the GPU launches.
# ---------------------------------------------------------------------------
@dataclass
class Launch:
    kernel: str  # KERNELS name
    launcher: str  # one of LAUNCHERS
    sizes: dict  # the launcher's rows / cols / col_block / slots, or n
    tuned: Autotuner  # the (recording) autotuner the launcher got
    prunes: list = field(default_factory=list)  # (named_args, kwargs, kept configs) per early_config_prune call
    runs: list = field(default_factory=list)  # (args, kwargs, grid) per kernel launch: benchmarks, then the pick


class _RecordedKernel:
    """Stands for the kernel inside the autotuner: records each launch, runs it when `execute`."""

    def __init__(self, fn, recorder):
        self.fn, self.arg_names, self.recorder = fn, fn.arg_names, recorder

    def run(self, *args, grid, warmup, **kwargs):
        self.recorder.current.runs.append((args, dict(kwargs), grid))
        if self.recorder.execute:
            return self.fn.run(*args, grid=grid, warmup=warmup, **kwargs)
        return None


class Recorder:
    def __init__(self, execute: bool, winner: str):
        self.execute, self.winner = execute, winner
        self.launches: list[Launch] = []
        self.current: Launch | None = None  # the launch in progress (the prunes the checks call are not one)

    def autotuner(self, tuned: Autotuner) -> Autotuner:
        _require_autotuner_api(tuned)
        rec = copy.copy(tuned)
        rec.cache = {}
        rec.fn = _RecordedKernel(tuned.fn, self)
        prune = tuned.early_config_prune

        def recorded_prune(configs, named_args, **kwargs):
            kept = prune(configs, named_args, **kwargs)
            if self.current is not None:
                self.current.prunes.append((dict(named_args), dict(kwargs), list(kept)))
            return kept

        rec.early_config_prune = recorded_prune
        benched = []

        def do_bench(kernel_call, quantiles):  # no CUDA events: run once, a time by position (first or last wins)
            kernel_call()
            benched.append(None)
            t = float(len(benched)) if self.winner == "first" else -float(len(benched))
            return [t, t, t]

        rec.__dict__["do_bench"] = do_bench  # over the cached_property; Autotuner._bench calls self.do_bench
        rec.benched = benched
        return rec

    def launcher(self, kind: str, original):
        def launch(kernel, tuned, size, *rest, **constexprs):
            tuned.cache.clear()  # every launch tunes: the prune of each one is checked
            tuned.benched.clear()
            if kind == "launch_flat":
                sizes = {"n": size}
            elif kind == "launch_rows":
                sizes = {"rows": size}
            else:
                cols, args, block, col_block, *slots = rest
                sizes = {"rows": size, "cols": cols, "col_block": col_block,
                         "slots": slots[0] if slots else constexprs.get("slots")}
            self.current = Launch(_kernel_name(kernel), kind, sizes, tuned)
            self.launches.append(self.current)
            try:
                return original(kernel, tuned, size, *rest, **constexprs)
            finally:
                self.current = None

        return launch


@pytest.fixture
def gpu_path(monkeypatch):
    """Makes the launchers take their GPU branch through recording autotuners; returns a factory
    recorder(execute, winner)."""

    def start(execute: bool = True, winner: str = "first") -> Recorder:
        recorder = Recorder(execute, winner)
        monkeypatch.setattr(_launch, "INTERPRET", False)
        for module, attr in TUNED.values():
            monkeypatch.setattr(module, attr, recorder.autotuner(getattr(module, attr)))
        for name in LAUNCHERS:
            monkeypatch.setattr(_launch, name, recorder.launcher(name, getattr(_launch, name)))
        if not execute:  # outputs are garbage then: no x-range check on them
            monkeypatch.setattr(_validate, "_VALIDATE_ARGS", False)
        return recorder

    return start


# ---------------------------------------------------------------------------
# The checks of one launch.
# ---------------------------------------------------------------------------
def _meta(tuned, args, kwargs) -> dict:
    """The kernel's arguments by name, as Triton binds them and passes them to a grid function."""
    meta = dict(zip(tuned.fn.arg_names, args))
    meta.update({k: v for k, v in kwargs.items() if k in tuned.fn.arg_names})
    return meta


def _config_of(kwargs) -> tuple:
    """(ROWS or BLOCK, num_warps) of a launch."""
    return (kwargs.get("ROWS", kwargs.get("BLOCK")), kwargs.get("num_warps"))


def _key_of(c) -> tuple:
    return (c.kwargs.get("ROWS", c.kwargs.get("BLOCK")), c.num_warps)


def _fp64(named_args) -> bool:
    return any(isinstance(v, torch.Tensor) and v.dtype == torch.float64 and v.numel() > 0
               for v in named_args.values())


def check_prune(launch: Launch) -> None:
    """The configs kept for one launch: non-empty, from the autotuner's list, within the tile budget,
    no BLOCK absurdly larger than the problem."""
    assert len(launch.prunes) == 1, f"{launch.kernel}: {len(launch.prunes)} prunes for one launch"
    named, kwargs, kept = launch.prunes[0]
    what = f"{launch.kernel} {launch.sizes}"
    assert kept, f"{what}: the prune kept no config"
    assert all(c in launch.tuned.configs for c in kept), f"{what}: the prune made up configs"
    assert len({_key_of(c) for c in kept}) == len(kept), f"{what}: duplicate configs {kept}"
    args = {**named, **kwargs}
    if launch.launcher == "launch_flat":
        n = launch.sizes["n"]
        for c in kept:
            block, w = c.kwargs["BLOCK"], c.num_warps
            assert block % 4 == 0, f"{what}: BLOCK {block} splits a Philox counter group"
            assert block / (32 * w) <= 8, f"{what}: {block} elements on {w} warps spill"
            assert block <= max(triton.next_power_of_2(n), 512), f"{what}: BLOCK {block} for {n} elements"
        return
    fp64 = bool(args["FP64"])
    assert fp64 == _fp64(named), f"{what}: FP64={args['FP64']} for float64 operands {_fp64(named)}"
    blocks = {b: args[b] for b in COLUMN_SIZE if b in args}
    assert blocks, f"{what}: no column-block constexpr among {sorted(args)}"
    for b, value in blocks.items():
        cols = args[COLUMN_SIZE[b]]
        assert value == _launch.block_for(cols), f"{what}: {b}={value} for {COLUMN_SIZE[b]}={cols}"
        assert value < 2 * max(cols, 1), f"{what}: {b}={value} for {cols} columns"
    block = max(blocks.values())
    per_thread = 8 if fp64 else 16  # the float64 rule: half the elements per thread
    for c in kept:
        rows, w = c.kwargs["ROWS"], c.num_warps
        assert rows * block <= per_thread * 32 * w, \
            f"{what}: ROWS={rows} x BLOCK={block} on {w} warps: over {per_thread} elements per thread"


def check_key(launch: Launch, perturb_with) -> None:
    """Every key names an argument and is in the key the autotuner formed; the configs kept depend on
    the key (and the constexprs) only: another value of any other integer argument keeps the same."""
    tuned = launch.tuned
    named, kwargs, kept = launch.prunes[0]
    missing = [k for k in tuned.keys if k not in tuned.arg_names]
    assert not missing, f"{launch.kernel}: autotune key {missing} not among the arguments {tuned.arg_names}"
    assert len(tuned.cache) == 1, f"{launch.kernel}: {len(tuned.cache)} tuning keys for one launch"
    key = next(iter(tuned.cache))
    want = tuple(named[k] for k in tuned.keys)
    assert tuple(key[:len(want)]) == want, f"{launch.kernel}: key {key} does not start with {tuned.keys} = {want}"
    other = {k: (perturb_with(v) if k not in tuned.keys and isinstance(v, int) and not isinstance(v, bool) else v)
             for k, v in named.items()}
    tuned.nargs = other
    try:
        again = tuned.prune_configs(kwargs)  # the autotuner's own method: early_config_prune, perf_model, top_k
    finally:
        tuned.nargs = None
    kept, again = [_key_of(c) for c in kept], [_key_of(c) for c in again]
    assert again == kept, (f"{launch.kernel}: the prune reads an argument outside the key {tuned.keys}: the configs "
                           f"(ROWS or BLOCK, num_warps) {kept} became {again} when only non-key arguments changed")


def check_torch_compile_prune(launch: Launch) -> None:
    """torch.compile's traced launch prunes with its own helper, passing the constexprs as kwargs
    (no grid, no warmup): it must keep the same configs."""
    from torch._higher_order_ops import triton_kernel_wrap as twrap

    hop = getattr(twrap, "TritonHOPifier", None)
    if hop is None or not hasattr(hop, "do_prune_configs"):
        pytest.skip(f"torch {torch.__version__}: no TritonHOPifier.do_prune_configs (torch.compile's prune)")
    named, kwargs, kept = launch.prunes[0]
    tuned = launch.tuned
    user_kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    theirs = hop.do_prune_configs(tuned, tuned.early_config_prune, tuned.perf_model, tuned.configs_top_k,
                                  tuned.configs, named, user_kwargs)
    assert [_key_of(c) for c in theirs] == [_key_of(c) for c in kept], f"{launch.kernel}: {theirs} vs {kept}"


def _once(counts: np.ndarray, what: str) -> None:
    assert counts.size == 0 or (counts.min() == 1 and counts.max() == 1), (
        f"{what}: covered {counts.min()} to {counts.max()} times, "
        f"first miss or repeat at {int(np.flatnonzero(counts != 1)[0])}")


def check_grid(launch: Launch, meta: dict, grid) -> None:
    """The grid of one launch covers every row (and column chunk, or flat element) exactly once,
    programs indexing as the kernels do: launch_rows rows pid * ROWS + [0, ROWS); launch_rows_2d
    row tiles range(pid0, cdiv(B, ROWS), grid0) and columns pid1 * BLOCK(_X) + [0, BLOCK(_X));
    launch_flat elements pid * BLOCK + [0, BLOCK). No program of a row tile or chunk grid is idle."""
    what = f"{launch.kernel} {launch.sizes} ROWS/BLOCK={_config_of(meta)}: grid {grid}"
    grid = tuple(grid) + (1,) * (3 - len(grid))
    assert all(isinstance(g, int) and g >= 1 for g in grid), what
    assert grid[2] == 1, what
    if launch.launcher == "launch_flat":
        n, block = launch.sizes["n"], meta["BLOCK"]
        assert grid[1] == 1 and (grid[0] - 1) * block < n <= grid[0] * block, f"{what}: for {n} elements"
        return
    rows, step = launch.sizes["rows"], meta["ROWS"]
    assert meta["B"] == rows, f"{what}: the kernel's B={meta['B']}, the launcher's rows={rows}"
    tiles = triton.cdiv(rows, step)
    if launch.launcher == "launch_rows":
        assert grid[1] == 1, what
        counts = np.zeros(grid[0] * step, dtype=np.int64)
        for pid in range(grid[0]):
            counts[pid * step:(pid + 1) * step] += 1
        _once(counts[:rows], f"{what}: rows")
        assert (grid[0] - 1) * step < rows, f"{what}: idle programs"
        return
    slots = launch.sizes["slots"]
    assert grid[0] == (slots or tiles), f"{what}: {grid[0]} row programs for slots={slots}, {tiles} tiles"
    tile_counts = np.zeros(tiles, dtype=np.int64)
    for pid in range(grid[0]):
        tile_counts[pid::grid[0]] += 1  # the kernels' range(program_id(0), cdiv(B, ROWS), num_programs(0))
    _once(tile_counts, f"{what}: row tiles")
    cols = launch.sizes["cols"]
    width = meta["BLOCK_X"] if "BLOCK_X" in meta else meta["BLOCK"]
    assert launch.sizes["col_block"] == width, f"{what}: chunks of {launch.sizes['col_block']}, kernel's {width}"
    assert (grid[1] - 1) * width < max(cols, 1) <= grid[1] * width, f"{what}: {grid[1]} chunks for {cols} columns"


def check_launch(launch: Launch) -> None:
    tuned = launch.tuned
    check_prune(launch)
    named, kwargs, kept = launch.prunes[0]
    picked = tuned.cache[next(iter(tuned.cache))]
    assert picked in kept, f"{launch.kernel}: picked {picked}, not among {kept}"
    benched = [_config_of(kw) for _, kw, _ in launch.runs[:-1]]
    assert benched in ([], [_key_of(c) for c in kept]), f"{launch.kernel}: benchmarked {benched} of {kept}"
    assert _config_of(launch.runs[-1][1]) == _key_of(picked), f"{launch.kernel}: launched another than the pick"
    for args, kw, grid in launch.runs:
        meta = _meta(tuned, args, kw)
        assert callable(grid), f"{launch.kernel}: the GPU path launches with a grid function"
        check_grid(launch, meta, grid(meta))


# ---------------------------------------------------------------------------
# Scenarios: every autotuned kernel, forward and backward through the public API.
# ---------------------------------------------------------------------------
GAUSS_VEC = ("gaussian", "vec", "vec")  # a [Dx] observation log-variance: the slot-reduced backward
SCENARIOS = {
    # name: (case builder (B, D, gen), the kernels it launches)
    "rsample": (lambda B, D, g: rsample_case(B, D, "seed", g), {"rsample_fwd", "rsample_bwd"}),
    "rsample_k3": (lambda B, D, g: rsample_k_case(3, B, D, "seed", g), {"rsample_fwd", "rsample_bwd"}),
    "kl_prior": (lambda B, D, g: kl_case(B, D, "row", g), {"kl_fwd", "kl_bwd"}),
    "bernoulli": (lambda B, D, g: bernoulli_case(B, D, "prob", g), {"loglik_fwd", "loglik_bwd"}),
    "gaussian_vec": (lambda B, D, g: gaussian_case(B, D, "vec", g), {"loglik_fwd", "loglik_bwd"}),
    "elbo_k2": (lambda B, D, g: elbo_k_case(2, B, D, 5, GAUSS_VEC, 0.7, g), {"elbo_fwd", "elbo_bwd"}),
    "iwae_k3": (lambda B, D, g: iwae_case(3, B, D, 5, GAUSS_VEC, g), {"iwae_fwd", "iwae_bwd"}),
    "free_bits": (lambda B, D, g: free_bits_case(B, D, "half", "row", g),
                  {"free_bits_cols", "free_bits_fwd", "free_bits_bwd"}),
}
# float32 with the first and with the last config kept as the pick; float64 (its own prune rule) with one.
PICKS = [pytest.param(torch.float32, "first", id="f32-first"), pytest.param(torch.float32, "last", id="f32-last"),
         pytest.param(torch.float64, "last", id="f64-last")]


def test_scenarios_cover_every_autotuned_kernel():
    """Every kernel of fastelbo.kernels is autotuned (row_autotune / flat_autotune) and launched by a
    scenario here: a new kernel must get one."""
    assert set(TUNED) == set(KERNELS), f"kernels without an autotuner: {set(KERNELS) - set(TUNED)}"
    launched = set().union(*(kernels for _, kernels in SCENARIOS.values()))
    assert launched == set(KERNELS), f"no scenario launches {set(KERNELS) - launched}"


@pytest.mark.parametrize("name", sorted(TUNED))
def test_autotune_keys_name_kernel_arguments(name):
    module, attr = TUNED[name]
    tuned = getattr(module, attr)
    _require_autotuner_api(tuned)
    assert tuned.arg_names == tuned.fn.arg_names
    assert tuned.keys, f"{name}: no autotune key"
    missing = [k for k in tuned.keys if k not in tuned.arg_names]
    assert not missing, f"{name}: autotune key {missing} not among the arguments {tuned.arg_names}"
    assert tuned.early_config_prune is not None and len(tuned.configs) > 1


def test_autotune_factories_refuse_names_the_kernel_lacks():
    """row_autotune / flat_autotune check every name their key and prune read against the kernel's
    arguments when the kernels are defined (at import, GPU or not), and that a flat prune's size is in
    the key: the rsample backward's "N" for its "M" fails here, not at the first GPU launch."""
    bwd, fwd = rsample._rsample_bwd_kernel, kl._kl_fwd_kernel
    with pytest.raises(ValueError, match=r"\['N'\], which are not arguments of the kernel"):
        _launch.flat_autotune(bwd, key=["N", "D"], size="N")
    with pytest.raises(ValueError, match=r"must hold 'M', which its prune reads"):
        _launch.flat_autotune(bwd, key=["D"], size="M")
    with pytest.raises(ValueError, match=r"autotune key of _kl_fwd_kernel names \['DX'\]"):
        _launch.row_autotune(fwd, key=["DX"])
    with pytest.raises(ValueError, match=r"row configurations of _rsample_bwd_kernel names \['ROWS'\]"):
        _launch.row_autotune(bwd, key=["D"])  # a flat kernel: no ROWS
    assert isinstance(_launch.flat_autotune(bwd, key=["M", "D"], size="M"), Autotuner)


@pytest.mark.parametrize("dtype, winner", PICKS)
@pytest.mark.parametrize("shape", [(7, 13), (1, 2100)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_gpu_launch_path(gpu_path, scenario, shape, dtype, winner):
    """Values and gradients vs the reference with the launches the GPU path makes (whichever config
    the benchmark picks), and the checks of every launch (module docstring)."""
    build, kernels = SCENARIOS[scenario]
    recorder = gpu_path(execute=True, winner=winner)
    run(build(*shape, generator_for("autotune-path", scenario, shape)), TRITON, dtype)
    assert {launch.kernel for launch in recorder.launches} == kernels
    for launch in recorder.launches:
        check_launch(launch)
        check_key(launch, lambda v: 7 * v + 3)
        check_torch_compile_prune(launch)


# (rows, D): 1, 7 and 4096 rows, odd D up to two column chunks (2049 > GPU_MAX_BLOCK); 4096 x 2049
# left out (over 3.2M elements per operand, and nothing the others do not cover).
GRID_SHAPES = [(r, d) for r in (1, 7, 4096) for d in (1, 13, 785, 2049) if r * d <= 4096 * 785]


@pytest.mark.parametrize("rows, cols", GRID_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_gpu_grids_cover_every_row(gpu_path, scenario, rows, cols):
    """The launches of every kernel for 1, 7 and 4096 rows and odd D, float32 and float64, without
    running the kernels: the prune, the key, and the grid of every config kept."""
    build, kernels = SCENARIOS[scenario]
    recorder = gpu_path(execute=False)
    for dtype in (torch.float32, torch.float64):
        recorder.launches.clear()
        case = build(rows, cols, generator_for("autotune-grid", scenario, rows, cols))
        _forward_backward(case, Api("triton"), dtype, DEVICE, False, False, 0)
        assert {launch.kernel for launch in recorder.launches} == kernels
        for launch in recorder.launches:
            check_launch(launch)
            named, kwargs, kept = launch.prunes[0]
            for c in kept:  # the grid of every config kept, benchmarked or not
                meta = {**_meta(launch.tuned, launch.runs[-1][0], launch.runs[-1][1]), **c.kwargs}
                check_grid(launch, meta, launch.runs[-1][2](meta))
            check_key(launch, lambda v: 7 * v + 3)
