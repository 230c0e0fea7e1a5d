"""The host side of the Triton kernels: tile sizes, autotuning, launching, and the
operand helpers of the launchers (strides, dummies for absent operands, results).

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

The kernels' other shared pieces: _checks.py (the ops' argument checks), _tiles.py (@triton.jit
loads and stores of tiles), _math.py (@triton.jit per-element math and noise).
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch
import triton
from torch.library import wrap_triton

from fastelbo._dtypes import acc_dtype

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
# Launch helpers
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


# ---------------------------------------------------------------------------
# Operand helpers of the launchers
# ---------------------------------------------------------------------------
def reduces_rows(s: torch.Tensor | None, rows: int) -> bool:
    """Whether the gradient of a [1, D] / [B, D] operand is a reduction over rows (a [1, D] one, B > 1)."""
    return s is not None and s.shape[0] == 1 and rows > 1


def bcast_strides(s: torch.Tensor | None) -> tuple[int, int]:
    """Strides of a [1, D] / [B, D] operand read as [B, D]: row stride 0 for a [1, D] one."""
    if s is None:
        return 0, 0
    return (0 if s.shape[0] == 1 else s.stride(0)), s.stride(1)


def row_partials(s: torch.Tensor, slots: int) -> torch.Tensor:
    """The [slots, D] per-slot partial sums of a reduction over rows, in the accumulation type."""
    return s.new_empty((slots, s.shape[1]), dtype=acc_dtype(s.dtype))


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
