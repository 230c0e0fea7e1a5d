"""Shared pieces of the Triton kernels: tile sizes, autotuning, launching, and
the @triton.jit helpers every op family uses (strided tile loads, the
accumulation type, the Philox noise of DESIGN §2).

Tiling. Row-reduction kernels (KL, log-likelihoods, ELBO) work on 2-D tiles
[ROWS, BLOCK] of the [B, D] operands: BLOCK columns of ROWS rows at a time,
looping over column chunks when D > BLOCK, so many short rows share a program
and long rows (Dx up to 3*256*256) stream through a few registers. BLOCK
follows D (next power of two, capped); ROWS and num_warps are autotuned on
GPUs (key: D and the tensors' dtypes). Elementwise noise kernels (rsample) use
flat blocks of BLOCK logical elements, a multiple of 4 so that each Philox
counter group lies in one program; BLOCK and num_warps are autotuned on the
element count (and D, dtypes).

Interpreter (TRITON_INTERPRET=1, CPU tensors): every program instance and
every loop trip costs milliseconds whatever the block size, so one fixed,
large configuration is used and nothing is autotuned.

Accumulation: float32 for float16/bfloat16/float32 inputs, float64 for
float64 inputs (FP64 constexpr), as the C++ kernels do.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# ---------------------------------------------------------------------------
# Tuning helpers
# ---------------------------------------------------------------------------
INTERPRET = bool(triton.knobs.runtime.interpret)  # fixed when the kernels are defined, as triton.jit decides

# Columns per chunk of a row: GPUs keep 8-16 values per thread per operand, the
# interpreter takes whole rows (a loop trip costs as much as a big block).
GPU_MAX_BLOCK = 2048
INTERPRET_MAX_BLOCK = 65536
INTERPRET_TILE = 16384  # elements of a [ROWS, BLOCK] tile under the interpreter
INTERPRET_FLAT_BLOCK = 65536  # elements per program of the flat (rsample) kernels
# Reductions of a [1, D] gradient over rows (kernels/loglik.py, elbo.py, iwae.py, the column sums
# of free_bits.py): per-slot partials [slots, D] in the accumulation type, then one sum over slots.
SLOT_ROWS = 8  # at least this many rows per slot: the partials stay a few rows, never [B, D]
GPU_REDUCE_PROGRAMS = 264  # about two programs per SM of an H100 (132 SMs), slots x column chunks
INTERPRET_REDUCE_PROGRAMS = 2  # two slots: the interpreter walks the multi-slot path too


def block_for(cols: int) -> int:
    """BLOCK for rows of `cols` columns: the next power of two, capped (longer rows loop)."""
    cap = INTERPRET_MAX_BLOCK if INTERPRET else GPU_MAX_BLOCK
    return min(triton.next_power_of_2(max(int(cols), 1)), cap)


def interpreter_rows(rows: int, block: int) -> int:
    return max(1, min(triton.next_power_of_2(max(int(rows), 1)), INTERPRET_TILE // block))


def _row_configs():
    # (ROWS, num_warps) candidates; the prune keeps the few that suit the BLOCK of a call.
    return [triton.Config({"ROWS": 2**i}, num_warps=w) for i in range(9) for w in (2, 4, 8)]


def prune_row_configs(configs, block: int, fp64: bool):
    """Per warp count, the smallest and the largest ROWS whose tile ROWS * block holds 1 to 16
    elements per thread per operand (8 for float64: no spills in the widest backward, see
    tests/test_triton_cubin.py) and is at least 1024 elements when rows are short."""
    per_thread = 8 if fp64 else 16
    keep = []
    for w in (2, 4, 8):
        fits = [c for c in configs
                if c.num_warps == w and 32 * w <= c.kwargs["ROWS"] * block <= per_thread * 32 * w]
        fits.sort(key=lambda c: c.kwargs["ROWS"])
        big = [c for c in fits if c.kwargs["ROWS"] * block >= 1024] or fits[-1:]
        keep += big[:1] + big[-1:] if len(big) > 1 else big
    return keep or [c for c in configs if c.kwargs["ROWS"] == 1 and c.num_warps == 8]


def _flat_configs():
    # At most 8 elements per thread: Philox keeps 4 words per counter group live (16 per thread spill).
    return [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((512, 2), (1024, 4), (1024, 8), (2048, 8))]


def prune_flat_configs(configs, n: int):
    """The configurations whose BLOCK is at most n's next power of two (or the smallest BLOCK)."""
    keep = [c for c in configs if c.kwargs["BLOCK"] <= max(triton.next_power_of_2(int(n)), 512)]
    return keep or configs[:1]


# A prune gets the launch as Triton's autotuner hands it over: early_config_prune(configs, named_args,
# **kwargs), named_args the positional arguments by the kernel's own names, kwargs the constexprs the
# launcher passes by keyword (and the autotuner's grid, warmup). Each prune is built for its kernel from
# names checked against the kernel's signature when the kernels are defined, so a renamed argument fails
# at import, not at the first launch on a GPU (the only place the autotuner runs).
ROW_BLOCKS = ("BLOCK", "BLOCK_X", "BLOCK_Z")  # the column-block constexprs a row kernel may have


def _kernel_name(kernel) -> str:
    return getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", repr(kernel))


def _require_arguments(kernel, what: str, names) -> None:
    missing = [n for n in names if n not in kernel.arg_names]
    if missing:
        raise ValueError(f"fastelbo: {what} of {_kernel_name(kernel)} names {missing}, which are not arguments of "
                         f"the kernel ({', '.join(kernel.arg_names)})")


def _launch_value(name: str, named_args: dict, kwargs: dict, kernel: str):
    """Argument `name` of a launch, by keyword or by position."""
    if name in kwargs:
        return kwargs[name]
    if name in named_args:
        return named_args[name]
    raise KeyError(f"fastelbo: the autotune prune of {kernel} needs its argument {name!r}, which the launch did "
                   f"not pass (got {sorted(named_args) + sorted(kwargs)})")


def row_autotune(kernel, key):
    """The GPU launcher of a [ROWS, BLOCK] kernel: ROWS and num_warps autotuned on `key` (+ dtypes).
    The prune reads the kernel's BLOCK* constexprs (functions of the key's sizes) and FP64 (of its dtypes)."""
    blocks = [b for b in ROW_BLOCKS if b in kernel.arg_names]
    if not blocks:
        raise ValueError(f"fastelbo: {_kernel_name(kernel)} has none of the column-block constexprs {ROW_BLOCKS}")
    _require_arguments(kernel, "the autotune key", key)
    _require_arguments(kernel, "the row configurations", ["ROWS", "FP64"])
    name = _kernel_name(kernel)

    def prune(configs, named_args, **kwargs):
        block = max([int(_launch_value(b, named_args, kwargs, name)) for b in blocks])
        return prune_row_configs(configs, block, bool(_launch_value("FP64", named_args, kwargs, name)))

    return triton.autotune(configs=_row_configs(), key=key, prune_configs_by={"early_config_prune": prune})(kernel)


def flat_autotune(kernel, key, size: str):
    """The GPU launcher of a flat kernel: BLOCK (elements per program) and num_warps autotuned on `key`
    (+ dtypes). `size` names the argument holding the number of elements the grid covers: the prune
    reads it, so it must be in the key (the autotuner keeps one choice per key: a prune that read
    anything else would make the first launch's choice stick to every later size)."""
    _require_arguments(kernel, "the autotune key", key)
    _require_arguments(kernel, "the flat configurations", [size, "BLOCK"])
    if size not in key:
        raise ValueError(f"fastelbo: the autotune key of {_kernel_name(kernel)} must hold {size!r}, which its prune "
                         f"reads, got {key}")
    name = _kernel_name(kernel)

    def prune(configs, named_args, **kwargs):
        return prune_flat_configs(configs, _launch_value(size, named_args, kwargs, name))

    return triton.autotune(configs=_flat_configs(), key=key, prune_configs_by={"early_config_prune": prune})(kernel)


# ---------------------------------------------------------------------------
# Launch helpers (host)
# ---------------------------------------------------------------------------
# The interpreter runs a launch on process-wide state (the builder's grid index and dimensions,
# triton.language patched for the duration of the launch): two threads launching at once read
# each other's program ids or find the language unpatched (wrong results, InterpreterErrors,
# crashes). Every interpreter launch below holds this lock; GPU launches do not need it.
INTERPRETER_LOCK = threading.Lock()


def _interpreter_tracing(args) -> bool:
    """Under the interpreter, fake tensors (shape propagation: torch.compile, opcheck) get
    no launch: the interpreter would read their data. On GPUs wrap_triton traces the launch."""
    from torch._subclasses.fake_tensor import is_fake

    return any(isinstance(t, torch.Tensor) and is_fake(t) for t in args)


def opaque_under_interpreter(op: str):
    """Decorates the body of triton_op `op`. torch.compile decomposes a triton_op into its kernel
    launches (wrap_triton), which the interpreter cannot trace; under the interpreter the op is
    kept whole in the graph instead (run eagerly by the compiled code). No effect on GPUs."""

    def decorator(fn):
        if not INTERPRET:
            return fn

        @functools.wraps(fn)
        def body(*args, **kwargs):
            from torch._subclasses.functional_tensor import FunctionalTensor

            if any(isinstance(a, FunctionalTensor) for a in args):
                with torch._functorch.config.patch(decompose_custom_triton_ops=False):
                    return getattr(torch.ops.fastelbo, op.split("::")[1]).default(*args, **kwargs)
            return fn(*args, **kwargs)

        return body

    return decorator


# The GPU grids: functions of `meta`, the launch's arguments by name with the autotuner's pick among
# them (ROWS or BLOCK), as Triton (and torch.compile) call a grid.
def rows_grid(rows: int):
    """launch_rows: a program per ROWS rows."""
    return lambda meta: (triton.cdiv(rows, meta["ROWS"]),)


def rows_2d_grid(rows: int, chunks: int, slots: int | None):
    """launch_rows_2d: (a program per ROWS rows, or `slots` programs) x column chunks."""
    return lambda meta: (slots or triton.cdiv(rows, meta["ROWS"]), chunks)


def flat_grid(n: int):
    """launch_flat: a program per BLOCK elements."""
    return lambda meta: (triton.cdiv(n, meta["BLOCK"]),)


def launch_rows(kernel, tuned, rows: int, args: tuple, block: int, **constexprs) -> None:
    """Runs a [ROWS, BLOCK] kernel over `rows` rows. `block` is the widest BLOCK* constexpr
    (already among `constexprs`); it sizes ROWS under the interpreter."""
    if rows == 0:
        return
    if INTERPRET:
        if _interpreter_tracing(args):
            return
        r = interpreter_rows(rows, block)
        with INTERPRETER_LOCK:
            kernel[(triton.cdiv(rows, r),)](*args, ROWS=r, **constexprs)
        return
    wrap_triton(tuned)[rows_grid(rows)](*args, **constexprs)


def reduce_slots(rows: int, chunks: int) -> int:
    """Row slots of a backward that reduces a [1, D] gradient over rows (launch_rows_2d `slots`):
    each slot's programs take every slots-th row tile and leave one partial row, so the partials are
    [slots, D] -- a few rows, never [B, D]: at least SLOT_ROWS rows per slot, and about
    REDUCE_PROGRAMS programs in all (slots x column chunks)."""
    target = INTERPRET_REDUCE_PROGRAMS if INTERPRET else GPU_REDUCE_PROGRAMS
    return max(1, min(triton.cdiv(max(int(rows), 1), SLOT_ROWS), triton.cdiv(target, max(int(chunks), 1))))


def launch_rows_2d(kernel, tuned, rows: int, cols: int, args: tuple, block: int, col_block: int,
                   slots: int | None = None, **constexprs) -> None:
    """Runs a backward [ROWS, BLOCK] kernel on a 2-D grid: axis 1 the column chunks of `col_block`
    columns (cdiv(cols, col_block)), axis 0 the row tiles (cdiv(rows, ROWS)), or `slots` programs
    that each loop over every slots-th row tile (when a [1, D] gradient is reduced over rows:
    the kernel walks range(program_id(0), cdiv(B, ROWS), num_programs(0)) either way)."""
    if rows == 0:
        return
    chunks = triton.cdiv(max(int(cols), 1), col_block)
    if INTERPRET:
        if _interpreter_tracing(args):
            return
        r = interpreter_rows(rows, block)
        with INTERPRETER_LOCK:
            kernel[(slots or triton.cdiv(rows, r), chunks)](*args, ROWS=r, **constexprs)
        return
    wrap_triton(tuned)[rows_2d_grid(rows, chunks, slots)](*args, **constexprs)


def launch_flat(kernel, tuned, n: int, args: tuple, **constexprs) -> None:
    """Runs a flat kernel over n logical elements (blocks of BLOCK, a multiple of 4)."""
    if n == 0:
        return
    if INTERPRET:
        if _interpreter_tracing(args):
            return
        block = min(INTERPRET_FLAT_BLOCK, max(4, triton.next_power_of_2(n)))
        with INTERPRETER_LOCK:
            kernel[(triton.cdiv(n, block),)](*args, BLOCK=block, **constexprs)
        return
    wrap_triton(tuned)[flat_grid(n)](*args, **constexprs)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_device(a: torch.Tensor, an: str, b: torch.Tensor, bn: str) -> None:
    """b is on a's device (the kernels take raw pointers: another device's memory is no operand)."""
    torch._check(b.device == a.device, lambda: f"fastelbo: {bn} must be on {a.device} like {an}, got {b.device}")


def check_like(a: torch.Tensor, an: str, b: torch.Tensor | None, bn: str) -> None:
    """b (when given) has a's shape and dtype; a is a 2-D floating tensor (as csrc/checks.h)."""
    torch._check(a.dim() == 2, lambda: f"fastelbo: {an} must be 2-D [B, D], got shape {tuple(a.shape)}")
    torch._check(a.dtype in _DTYPES, lambda: f"fastelbo: {an} must be float16, bfloat16, float32 or float64, "
                 f"got {a.dtype}")
    if b is None:
        return
    torch._check(b.shape == a.shape, lambda: f"fastelbo: {bn} must have the shape of {an} {tuple(a.shape)}, "
                 f"got {tuple(b.shape)}")
    torch._check(b.dtype == a.dtype, lambda: f"fastelbo: {bn} must have dtype {a.dtype}, got {b.dtype}")
    check_device(a, an, b, bn)


def check_samples(t: torch.Tensor | None, name: str, like: torch.Tensor, like_name: str) -> None:
    """t (when given) is [K, B, D] over a [B, D] operand `like`: same (B, D), dtype and device."""
    if t is None:
        return
    torch._check(t.dim() == 3 and tuple(t.shape[1:]) == tuple(like.shape), lambda: (
        f"fastelbo: {name} must be [K, B, D] with [B, D] = {like_name}'s {tuple(like.shape)}, got {tuple(t.shape)}"))
    torch._check(t.dtype == like.dtype, lambda: f"fastelbo: {name} must have dtype {like.dtype}, got {t.dtype}")
    check_device(like, like_name, t, name)


def check_obs_logvar(s: torch.Tensor | None, name: str, x: torch.Tensor, x_name: str = "x") -> None:
    """An observation log-variance: [1, D] (one per feature, broadcast over rows) or [B, D] (per row)
    for x [B, D]; x's dtype and device."""
    if s is None:
        return
    B, D = x.shape
    torch._check(s.dim() == 2 and s.shape[1] == D and s.shape[0] in (1, B), lambda: (
        f"fastelbo: {name} must be [1, {D}] (per feature) or [{B}, {D}] (per row), got {tuple(s.shape)}"))
    torch._check(s.dtype == x.dtype, lambda: f"fastelbo: {name} must have dtype {x.dtype}, got {s.dtype}")
    check_device(x, x_name, s, name)


def reduces_rows(s: torch.Tensor | None, rows: int) -> bool:
    """Whether the gradient of a [1, D] / [B, D] operand is a reduction over rows (a [1, D] one, B > 1)."""
    return s is not None and s.shape[0] == 1 and rows > 1


def bcast_strides(s: torch.Tensor | None) -> tuple[int, int]:
    """Strides of a [1, D] / [B, D] operand read as [B, D]: row stride 0 for a [1, D] one."""
    if s is None:
        return 0, 0
    return (0 if s.shape[0] == 1 else s.stride(0)), s.stride(1)


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The accumulation type of t's dtype (DESIGN §1): float64 for float64, float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def row_partials(s: torch.Tensor, slots: int) -> torch.Tensor:
    """The [slots, D] per-slot partial sums of a reduction over rows, in the accumulation type."""
    return s.new_empty((slots, s.shape[1]), dtype=acc_dtype(s))


def check_row_grad(g: torch.Tensor | None, name: str, like: torch.Tensor) -> None:
    """An upstream gradient of a per-row result: [B], the rows' dtype."""
    if g is None:
        return
    torch._check(g.dim() == 1 and g.shape[0] == like.shape[0],
                 lambda: f"fastelbo: {name} must have shape [{like.shape[0]}], got {tuple(g.shape)}")
    torch._check(g.dtype == like.dtype, lambda: f"fastelbo: {name} must have dtype {like.dtype}, got {g.dtype}")
    check_device(like, "the other operands", g, name)


X_RANGE_MESSAGE = ("fastelbo: x must lie in [0, 1] for the Bernoulli likelihood "
                   "(pass validate_args=False to skip this check)")


def check_unit_interval(bad_rows: torch.Tensor) -> None:
    """Raises ValueError (as the C++ kernels do) when a forward kernel flagged a row with x outside
    [0, 1]: one device sync in eager mode; while tracing (torch.compile) an async assert in the graph."""
    from torch._subclasses.fake_tensor import is_fake

    bad = bad_rows.any()
    if is_fake(bad_rows):
        torch._assert_async(~bad, X_RANGE_MESSAGE)
    elif bool(bad):
        raise ValueError(X_RANGE_MESSAGE)


def fp64(t: torch.Tensor) -> int:
    return int(t.dtype == torch.float64)


def split_float(value: float) -> tuple[float, float]:
    """value as hi + lo, two float32 numbers (Triton passes Python floats as fp32):
    exact to ~2^-48 relative, so float64 kernels see beta in float64."""
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


def strides(t: torch.Tensor | None) -> tuple[int, int]:
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def or_dummy(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A pointer argument for an absent optional operand (never read: its HAS_* flag is 0)."""
    return like if t is None else t


def grad_or_empty(wanted: bool, like: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous gradient, or an empty tensor for one not asked for (as the C++ ops); the
    kernels get the empty one as the pointer of an output they do not write (its WANT_* is 0)."""
    return like.new_empty(like.shape) if wanted else like.new_empty(0)


# ---------------------------------------------------------------------------
# @triton.jit helpers
# ---------------------------------------------------------------------------
@triton.jit
def acc(x, FP64: tl.constexpr):
    """x in the accumulation type: float64 for float64 kernels, float32 otherwise."""
    if FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def float_pair(hi, lo, ROWS: tl.constexpr, FP64: tl.constexpr):
    """hi + lo (two float32 kernel arguments, see split_float) in the accumulation type, as [ROWS]."""
    return acc(tl.full([ROWS], hi, tl.float32), FP64) + acc(tl.full([ROWS], lo, tl.float32), FP64)


@triton.jit
def row_ids(pid, ROWS: tl.constexpr):
    """The int64 row indices of program pid's tile."""
    return pid * ROWS + tl.arange(0, ROWS).to(tl.int64)


@triton.jit
def load_tile(ptr, rows, cols, s0, s1, mask, FP64: tl.constexpr):
    """[ROWS, BLOCK] tile of a [B, D] operand with strides (s0, s1) (0 = broadcast), upcast."""
    offs = rows[:, None] * s0 + cols[None, :].to(tl.int64) * s1
    return acc(tl.load(ptr + offs, mask=mask, other=0.0), FP64)


@triton.jit
def load_prior(pmu_ptr, plv_ptr, rows, cols, s_pm0, s_pm1, s_pl0, s_pl1, mask, mu, lv,
               HAS_PRIOR: tl.constexpr, FP64: tl.constexpr):
    """(pmu, plv) tiles of the prior N(pmu, e^plv); without a prior (N(0, 1)) nothing is read and
    the given tiles (mu, lv) stand in: the latent math below never reads them then."""
    if HAS_PRIOR:
        return (load_tile(pmu_ptr, rows, cols, s_pm0, s_pm1, mask, FP64),
                load_tile(plv_ptr, rows, cols, s_pl0, s_pl1, mask, FP64))
    else:
        return mu, lv


@triton.jit
def load_posterior_prior(mu_ptr, lv_ptr, pmu_ptr, plv_ptr, rows, cols,
                         s_m0, s_m1, s_l0, s_l1, s_pm0, s_pm1, s_pl0, s_pl1, mask,
                         HAS_PRIOR: tl.constexpr, FP64: tl.constexpr):
    """(mu, lv, pmu, plv) tiles of q = N(mu, e^lv) and of the prior (load_prior), upcast."""
    mu = load_tile(mu_ptr, rows, cols, s_m0, s_m1, mask, FP64)
    lv = load_tile(lv_ptr, rows, cols, s_l0, s_l1, mask, FP64)
    pmu, plv = load_prior(pmu_ptr, plv_ptr, rows, cols, s_pm0, s_pm1, s_pl0, s_pl1, mask, mu, lv, HAS_PRIOR, FP64)
    return mu, lv, pmu, plv


@triton.jit
def store_tile(ptr, rows, cols, D, value, mask):
    """Stores a [ROWS, BLOCK] tile into a contiguous [B, D] result (rounded to its dtype)."""
    offs = rows[:, None] * D + cols[None, :]
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_row_scalar(ptr, rows, s0, row_mask, HAS: tl.constexpr, FP64: tl.constexpr):
    """A [B] per-row value (upstream gradient, maybe expanded with stride 0); 0 when absent."""
    if HAS:
        return acc(tl.load(ptr + rows * s0, mask=row_mask, other=0.0), FP64)
    else:
        return acc(tl.zeros(rows.shape, dtype=tl.float32), FP64)


@triton.jit
def box_muller(u0, u1):
    """tl.pair_uniform_to_normal in the uniforms' type (fastelbo_math.h box_muller)."""
    u0 = tl.maximum(1.0e-7, u0)
    th = 6.283185307179586 * u1
    r = tl.sqrt(-2.0 * tl.log(u0))
    return r * tl.cos(th), r * tl.sin(th)


@triton.jit
def log1p_unit(t, FP64: tl.constexpr):
    """log1p(t) for t = e^-|l| in (0, 1] (fastelbo_math.h log1p_unit): the 7-term atanh series of
    log1p_unit_series in single precision; in double, log(1 + t) * t / ((1 + t) - 1), accurate to
    an ulp or two (C++: ::log1p; Triton has no portable log1p)."""
    if FP64:
        u = 1.0 + t
        d = u - 1.0
        return tl.where(d == 0.0, t, tl.log(u) * (t / tl.where(d == 0.0, 1.0, d)))
    else:
        s = t / (2.0 + t)
        w = s * s
        p = 1.0 / 13
        p = p * w + 1.0 / 11
        p = p * w + 1.0 / 9
        p = p * w + 1.0 / 7
        p = p * w + 1.0 / 5
        p = p * w + 1.0 / 3
        p = p * w + 1.0
        return 2.0 * s * p


@triton.jit
def _normal_lanes(seed, groups, FP64: tl.constexpr):
    """The four normals (lanes 0-3) of counter groups `groups`: Box-Muller on lanes (0, 1) and (2, 3)."""
    u0, u1, u2, u3 = tl.rand4x(seed, groups)
    n0, n1 = box_muller(acc(u0, FP64), acc(u1, FP64))
    n2, n3 = box_muller(acc(u2, FP64), acc(u3, FP64))
    return n0, n1, n2, n3


@triton.jit
def _flat_lanes(n0, n1, n2, n3):
    """[G] x 4 lanes -> [4G] in element order (lane l of group g is element 4g + l)."""
    # join appends the last dim: [G, 2, 2] with [g, i, k] = lane 2i + k, flattened row-major.
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (4 * n0.shape[0], ))


@triton.jit
def normals(seed, groups, FP64: tl.constexpr):
    """eps of the 4 * G logical elements of counter groups `groups` ([G], int64, consecutive),
    flat and in element order: lane l of group g is element 4g + l (DESIGN §2). Uniforms are
    exact float32 (tl.rand4x); Box-Muller runs in the accumulation type, so for float32 this
    is tl.randn4x."""
    n0, n1, n2, n3 = _normal_lanes(seed, groups, FP64)
    return _flat_lanes(n0, n1, n2, n3)


@triton.jit
def normals_at(seed, n0, G: tl.constexpr, FP64: tl.constexpr):
    """eps of the 4 * G consecutive logical elements n0, n0 + 1, ... (n0 an int64 scalar, any
    alignment), flat. Aligned (n0 % 4 == 0): normals(). Otherwise element 4g + l is lane (l + o) % 4
    of group g0 + g + (l + o) // 4 (o = n0 % 4): the groups g0 + g and g0 + g + 1 are both drawn
    and each lane picks its word -- twice the Philox work, only for unaligned starts (rsample's
    backward over K samples of a [B, D] with B * D % 4 != 0)."""
    g0 = n0 // 4
    o = n0 - g0 * 4
    groups = g0 + tl.arange(0, G).to(tl.int64)
    a0, a1, a2, a3 = _normal_lanes(seed, groups, FP64)
    if o == 0:
        eps = _flat_lanes(a0, a1, a2, a3)
    else:
        b0, b1, b2, b3 = _normal_lanes(seed, groups + 1, FP64)
        # element lanes l = 0..3 take word l + o of (a0, a1, a2, a3, b0, b1, b2, b3), o in {1, 2, 3}
        e0 = tl.where(o == 1, a1, tl.where(o == 2, a2, a3))
        e1 = tl.where(o == 1, a2, tl.where(o == 2, a3, b0))
        e2 = tl.where(o == 1, a3, tl.where(o == 2, b0, b1))
        e3 = tl.where(o == 1, b0, tl.where(o == 2, b1, b2))
        eps = _flat_lanes(e0, e1, e2, e3)
    return eps


# ---------------------------------------------------------------------------
# Per-element latent math (fastelbo_math.h kl_std, kl_normal, log_pq_std, log_pq_normal and their _grad):
# q = N(mu, e^lv), p = N(pmu, e^plv) or N(0, 1) without a prior (pmu, plv then unread: pass any tile).
# ---------------------------------------------------------------------------
@triton.jit
def kl_element(mu, lv, pmu, plv, HAS_PRIOR: tl.constexpr):
    """KL(q || p) of one latent element:
        0.5 (e^lv + mu^2 - 1 - lv)                              (kl_std)
        0.5 (plv - lv + e^(lv - plv) + (mu - pmu)^2 e^-plv - 1)  (kl_normal)"""
    if HAS_PRIOR:
        d = mu - pmu
        return 0.5 * (plv - lv + (tl.exp(lv - plv) + d * d * tl.exp(-plv)) - 1.0)
    else:
        return 0.5 * (tl.exp(lv) + mu * mu - 1.0 - lv)


@triton.jit
def kl_element_grad(mu, lv, pmu, plv, HAS_PRIOR: tl.constexpr):
    """(dmu, dlv, dpmu, dplv) of kl_element (kl_std_grad / kl_normal_grad):
        dmu = mu, dlv = (e^lv - 1) / 2                                       (no prior; dpmu, dplv = 0)
        dmu = (mu - pmu) e^-plv = -dpmu, dlv = (e^(lv - plv) - 1) / 2,
        dplv = (1 - e^(lv - plv) - (mu - pmu)^2 e^-plv) / 2
    Unused results cost nothing (the compiler drops them and their loads)."""
    if HAS_PRIOR:
        var_ratio = tl.exp(lv - plv)
        d = mu - pmu
        inv_pvar = tl.exp(-plv)
        dmu = d * inv_pvar
        return dmu, 0.5 * (var_ratio - 1.0), 0.0 - dmu, 0.5 * (1.0 - var_ratio - d * d * inv_pvar)
    else:
        return mu, 0.5 * (tl.exp(lv) - 1.0), 0.0 * mu, 0.0 * mu


@triton.jit
def log_pq_element(z, mu, lv, pmu, plv, HAS_PRIOR: tl.constexpr):
    """log p(z) - log q(z | x) of one latent element (the -0.5 log 2pi terms cancel exactly):
        0.5 (lv - plv) + 0.5 (z - mu)^2 e^-lv - 0.5 (z - pmu)^2 e^-plv    (pmu = plv = 0 without a prior)"""
    a = z - mu
    q = a * a * tl.exp(-lv)
    if HAS_PRIOR:
        c = z - pmu
        return 0.5 * (lv - plv) + 0.5 * q - 0.5 * (c * c * tl.exp(-plv))
    else:
        return 0.5 * lv + 0.5 * q - 0.5 * (z * z)


@triton.jit
def log_pq_element_grad(z, mu, lv, pmu, plv, HAS_PRIOR: tl.constexpr):
    """(dz, dmu, dlv, dpmu, dplv) of log_pq_element, with wq = (z - mu) e^-lv, wp = (z - pmu) e^-plv:
        dz = wq - wp, dmu = -wq, dlv = (1 - (z - mu) wq) / 2, dpmu = wp, dplv = ((z - pmu) wp - 1) / 2"""
    a = z - mu
    wq = a * tl.exp(-lv)
    if HAS_PRIOR:
        c = z - pmu
        wp = c * tl.exp(-plv)
        dplv = 0.5 * (c * wp - 1.0)
    else:
        wp = z
        dplv = 0.0 * z
    return wq - wp, 0.0 - wq, 0.5 * (1.0 - a * wq), wp, dplv
