"""The Triton backend's own checks (the shared suite checks every op's values and
gradients on it, like every fused backend):

  * same noise: Triton eps == C++ CPU eps for one seed and shape (float rounding only);
  * long rows (Dx = 3*256*256) and rows/tiles cut into several chunks and programs;
  * upstream gradients absent (None) or expanded (stride 0), partial output masks;
  * backend="triton" where it cannot run raises a clear error (subprocess, no interpreter);
  * torch.compile(fullgraph=True) over the Triton ops: no graph break, same values and gradients;
  * the GPU autotuning space stays within the no-spill tile budget;
  * fastelbo.kernels.OPS keeps the call signatures of torch.ops.fastelbo.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by
conftest.py); the GPU build itself is checked in test_triton_cubin.py.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastelbo
from fastelbo import _backend, reference
from helpers import assert_close, backend_device

DEVICE = backend_device("triton")
TRITON_OK, TRITON_WHY = _backend.available("triton", DEVICE)
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=f"backend 'triton' on {DEVICE}: {TRITON_WHY}")
INTERPRETED = TRITON_OK and DEVICE == "cpu"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _t(shape, gen, lo=-2.0, hi=2.0, dtype=torch.float32):
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype=dtype, device=DEVICE)


# ---------------------------------------------------------------------------
# Same noise as the C++ kernels (docs/design.md §3).
# ---------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(3, 5), (1, 1), (7, 13), (4, 8), (2, 1030)], ids=lambda s: "x".join(map(str, s)))
def test_eps_matches_cpp_cpu_eps(shape, dtype):
    """rsample(mu=0, logvar=0) is eps itself: Triton's equals the C++ CPU kernel's for the same seed
    and shape, row lengths that are not a multiple of 4 included (groups of 4 span rows)."""
    ok, why = _backend.available("cpu", "cpu")
    if not ok:
        pytest.skip(f"the C++ CPU kernels are unavailable: {why}")
    zeros = torch.zeros(shape, dtype=dtype)
    for seed in (0, 123456789123, 2**64 - 12345):  # the last one is negative as int64: both key words used
        s = fastelbo._seed.seed_tensor(torch.device("cpu"), seed=seed)
        cpp = torch.ops.fastelbo.rsample(zeros, zeros, s, None)
        tri = torch.ops.fastelbo.triton_rsample(zeros.to(DEVICE), zeros.to(DEVICE), s.to(DEVICE), None).cpu()
        # Float rounding only: the uniforms are bit-identical, Box-Muller's log/sqrt/sin/cos differ in the last ulps.
        tol = dict(rtol=0, atol=2e-6) if dtype == torch.float32 else dict(rtol=0, atol=1e-13)
        torch.testing.assert_close(tri, cpp, **tol, msg=lambda m: f"seed {seed}: {m}")
        ref = reference.standard_normal(s, shape, dtype=dtype)
        torch.testing.assert_close(tri, ref, **tol, msg=lambda m: f"seed {seed} vs reference: {m}")


# ---------------------------------------------------------------------------
# Long rows and chunked tiles.
# ---------------------------------------------------------------------------
def _elbo_case(B, DX, DZ, likelihood, gen, dtype=torch.float32):
    x = _t((B, DX), gen, 0, 1, dtype) if likelihood == "bernoulli" else _t((B, DX), gen, -1, 1, dtype)
    recon, mu, lv = _t((B, DX), gen, dtype=dtype), _t((B, DZ), gen, dtype=dtype), _t((B, DZ), gen, -1, 1, dtype)
    obs = _t((DX,), gen, -1, 1, dtype) if likelihood == "gaussian" else None
    return x, recon, mu, lv, obs


def _check_elbo(x, recon, mu, lv, obs, likelihood, prior, beta=0.8):
    """fastelbo.elbo (backend triton) forward and all gradients vs the float64 reference."""
    pm, pl = (0.3, -0.2) if prior else (None, None)
    ins = [t.detach().clone().requires_grad_(True) for t in (x, recon, mu, lv)]
    obs_t = obs.detach().clone().requires_grad_(True) if obs is not None else None
    kw = dict(likelihood=likelihood, prior_mu=pm, prior_logvar=pl, beta=beta)
    out = fastelbo.elbo(ins[1], ins[0], *ins[2:], obs_logvar=obs_t, backend="triton", validate_args=False, **kw)
    ins64 = [t.detach().double().requires_grad_(True) for t in (x, recon, mu, lv)]
    obs64 = obs.detach().double().requires_grad_(True) if obs is not None else None
    ref = reference.elbo(ins64[1], ins64[0], *ins64[2:], obs_logvar=obs64, **kw)
    g = torch.linspace(-1.5, 2.0, x.shape[0], dtype=torch.float64, device=x.device)  # not 1, mixed signs
    (out.elbo * g.to(x.dtype) + 0.5 * out.kl).sum().backward()
    (ref.elbo * g + 0.5 * ref.kl).sum().backward()
    DX, DZ = x.shape[1], mu.shape[1]
    for name, a, r, n in (("elbo", out.elbo, ref.elbo, DX), ("loglik", out.log_likelihood, ref.log_likelihood, DX),
                          ("kl", out.kl, ref.kl, DZ)):
        assert_close(a.detach(), r.detach().to(a.dtype), ref64=r.detach(), n=n, name=name)
    for name, a, r in zip(("dx", "drecon", "dmu", "dlogvar"), ins, ins64):
        assert_close(a.grad, r.grad.to(a.dtype), ref64=r.grad, name=name)
    if obs is not None:
        assert_close(obs_t.grad, obs64.grad.to(obs.dtype), ref64=obs64.grad, n=x.shape[0], name="dobs_logvar")


@needs_triton
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_long_rows_forward_backward(likelihood):
    """Dx = 3*256*256 (an image row): the column loop crosses several chunks; one launch each way."""
    gen = _gen(3)
    x, recon, mu, lv, obs = _elbo_case(2, 3 * 256 * 256, 5, likelihood, gen)
    _check_elbo(x, recon, mu, lv, obs, likelihood, prior=likelihood == "gaussian")


@needs_triton
def test_long_rows_rsample():
    gen = _gen(4)
    mu, lv = _t((2, 3 * 256 * 256), gen), _t((2, 3 * 256 * 256), gen, -1, 1)
    mu_ = mu.clone().requires_grad_(True)
    lv_ = lv.clone().requires_grad_(True)
    z = fastelbo.rsample(mu_, lv_, seed=2**40 + 7, backend="triton")
    eps = reference.standard_normal(fastelbo._seed.seed_tensor(torch.device(DEVICE), seed=2**40 + 7), mu.shape,
                                    device=DEVICE)
    torch.testing.assert_close(z, mu + torch.exp(0.5 * lv) * eps, rtol=1e-5, atol=1e-5)
    gz = _t(mu.shape, gen)
    z.backward(gz)
    torch.testing.assert_close(mu_.grad, gz)
    torch.testing.assert_close(lv_.grad, 0.5 * gz * torch.exp(0.5 * lv) * eps, rtol=1e-5, atol=1e-5)


@pytest.fixture
def small_tiles(monkeypatch):
    """Interpreter tiles cut small, so that odd shapes take several column chunks (a partial last one)
    and several row programs (a partial last one), as GPU tiles do."""
    if not INTERPRETED:
        pytest.skip("interpreter tile sizes (the GPU ones are autotuned)")
    from fastelbo.kernels import _launch

    monkeypatch.setattr(_launch, "INTERPRET_MAX_BLOCK", 256)
    monkeypatch.setattr(_launch, "INTERPRET_TILE", 1024)
    monkeypatch.setattr(_launch, "INTERPRET_FLAT_BLOCK", 256)


@needs_triton
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_chunked_tiles_weird_shape(small_tiles, likelihood):
    """41 x 1271 (Dx), Dz = 300: 5 and 2 column chunks per row, 4 rows per program, 11 programs."""
    gen = _gen(5)
    x, recon, mu, lv, obs = _elbo_case(41, 1271, 300, likelihood, gen)
    recon = recon.t().contiguous().t()  # column-major: strided loads
    _check_elbo(x, recon, mu, lv, obs, likelihood, prior=True)


@needs_triton
def test_chunked_tiles_rsample_strided(small_tiles):
    """Flat blocks of 256 over a transposed 41 x 37: blocks start mid-row, the eps groups of 4 span rows."""
    gen = _gen(6)
    mu, lv = _t((37, 41), gen).t(), _t((41, 37), gen, -1, 1)
    s = fastelbo._seed.seed_tensor(torch.device(DEVICE), seed=99)
    z = torch.ops.fastelbo.triton_rsample(mu, lv, s, None)
    eps = reference.standard_normal(s, mu.shape, device=DEVICE)
    torch.testing.assert_close(z, mu + torch.exp(0.5 * lv) * eps, rtol=1e-5, atol=1e-5)
    g = _t(mu.shape, gen).t().contiguous().t()
    dlv, deps = torch.ops.fastelbo.triton_rsample_backward(g, lv, s, None, [True, True])
    torch.testing.assert_close(deps, g * torch.exp(0.5 * lv), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dlv, 0.5 * g * torch.exp(0.5 * lv) * eps, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Backward ops: absent / expanded upstream gradients, partial output masks.
# ---------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_elbo_backward_none_and_expanded_grads(likelihood):
    gen = _gen(7)
    B, DX, DZ = 6, 19, 7
    x, recon, mu, lv, obs = _elbo_case(B, DX, DZ, likelihood, gen)
    s = obs.expand(B, DX) if obs is not None else None
    pm, pl = _t((DZ,), gen).expand(B, DZ), _t((DZ,), gen, -1, 1).expand(B, DZ)
    beta = 1.7
    g_elbo = torch.full((), -0.75, device=DEVICE).expand(B)  # stride 0
    g_kl = _t((B,), gen)
    grads = torch.ops.fastelbo.triton_elbo_backward(g_elbo, None, g_kl, x, recon, mu, lv, s, pm, pl, likelihood, beta,
                                                    [True] * 7)
    # Expected: autograd through the float64 reference with the same upstream gradients (None = 0).
    ins = [t.double().requires_grad_(True) for t in (x, recon, mu, lv)]
    s64 = s.double().requires_grad_(True) if s is not None else None
    pm64, pl64 = pm.double().requires_grad_(True), pl.double().requires_grad_(True)
    ref = reference.elbo(ins[1], ins[0], *ins[2:], likelihood=likelihood, obs_logvar=s64, prior_mu=pm64, prior_logvar=pl64, beta=beta)
    (ref.elbo * g_elbo.double() + ref.kl * g_kl.double()).sum().backward()
    expected = [t.grad for t in ins] + [s64.grad if s64 is not None else None, pm64.grad, pl64.grad]
    names = ("dx", "drecon", "dmu", "dlogvar", "dobs_logvar", "dprior_mu", "dprior_logvar")
    for name, got, want in zip(names, grads, expected):
        if want is None:
            assert got.numel() == 0, f"{name}: not a Gaussian likelihood, expected an empty tensor"
            continue
        assert got.is_contiguous() and got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")

    # A partial mask: the unwanted gradients are empty tensors, the wanted ones unchanged.
    mask = [False, True, False, True, False, True, False]
    part = torch.ops.fastelbo.triton_elbo_backward(g_elbo, None, g_kl, x, recon, mu, lv, s, pm, pl, likelihood, beta,
                                                   mask)
    for name, wanted, got, full in zip(names, mask, part, grads):
        if wanted:
            torch.testing.assert_close(got, full, msg=lambda m: f"{name}: {m}")
        else:
            assert got.numel() == 0, f"{name} was not asked for"

    # No upstream gradient at all: zeros.
    zero = torch.ops.fastelbo.triton_elbo_backward(None, None, None, x, recon, mu, lv, s, pm, pl, likelihood, beta,
                                                   [True] * 7)
    assert all((t == 0).all() for t in zero)


@needs_triton
def test_kl_and_loglik_backward_expanded_grad():
    gen = _gen(8)
    B, D = 5, 9
    mu, lv, x, r = _t((B, D), gen), _t((B, D), gen, -1, 1), _t((B, D), gen, 0, 1), _t((B, D), gen)
    g = torch.full((), 1.25, device=DEVICE).expand(B)
    dmu, dlv, dpm, dpl = torch.ops.fastelbo.triton_gaussian_kl_backward(g, mu, lv, None, None, [True, True, True, True])
    torch.testing.assert_close(dmu, 1.25 * mu)
    torch.testing.assert_close(dlv, 1.25 * 0.5 * (torch.exp(lv) - 1))
    assert dpm.numel() == 0 and dpl.numel() == 0  # no prior: no prior gradients
    dl, dx = torch.ops.fastelbo.triton_bernoulli_log_prob_backward(g, r, x, [True, False])
    torch.testing.assert_close(dl, 1.25 * (x - torch.sigmoid(r)))
    assert dx.numel() == 0


# ---------------------------------------------------------------------------
# Threads: the interpreter keeps global state per launch (kernels/_launch.py serializes them).
# ---------------------------------------------------------------------------
def _threaded_step(x, recon, mu, lv):
    """Forward and backward through every launch helper: rsample (flat), the ELBO (rows, and its
    backward on a 2-D grid), free bits (its column sums on a 2-D grid)."""
    ins = [t.clone().requires_grad_(True) for t in (recon, mu, lv)]
    z = fastelbo.rsample(ins[1], ins[2], seed=321, backend="triton")
    loss = fastelbo.ELBOLoss(free_bits=0.1, backend="triton")(ins[0], x, ins[1], ins[2]) + (z * z).sum()
    return [loss.detach(), z.detach(), *torch.autograd.grad(loss, ins)]


@needs_triton
def test_concurrent_threads_match_a_single_thread():
    """Several Python threads running the Triton ops at once get, bit for bit, the results of a
    single-threaded run (under the interpreter, unserialized launches gave NaNs, InterpreterErrors
    and once a segmentation fault)."""
    import threading

    gen = _gen(11)
    x, recon, mu, lv, _ = _elbo_case(16, 40, 6, "bernoulli", gen, dtype=torch.float16)
    x = x.round()
    expected = _threaded_step(x, recon, mu, lv)
    n_threads, steps = 6, 3
    start = threading.Barrier(n_threads)
    results, errors = [], []

    def work():
        start.wait()
        for _ in range(steps):
            try:
                results.append(_threaded_step(x, recon, mu, lv))
            except Exception as e:  # noqa: BLE001  (reported below, with the others)
                errors.append(f"{type(e).__name__}: {e}"[:200])

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} of {n_threads * steps} steps raised: {errors[:3]}"
    assert len(results) == n_threads * steps
    names = ("loss", "z", "drecon", "dmu", "dlogvar")
    wrong = [name for out in results for name, a, b in zip(names, out, expected) if not torch.equal(a, b)]
    assert not wrong, f"{len(wrong)} results differ from the single-threaded run: {sorted(set(wrong))}"


# ---------------------------------------------------------------------------
# Backend choice.
# ---------------------------------------------------------------------------
_NO_INTERPRETER = textwrap.dedent("""
    import os, sys
    import torch
    import fastelbo
    from fastelbo import _backend

    ok, why = _backend.available("triton", "cpu")
    assert not ok and "TRITON_INTERPRET=1" in why and "backend='cpu'" in why, why
    try:
        fastelbo.gaussian_kl(torch.randn(2, 3), torch.randn(2, 3), backend="triton")
    except RuntimeError as e:
        msg = str(e)
        assert "TRITON_INTERPRET=1" in msg and "backend='cpu'" in msg, msg
        print("ERROR:", msg)
    else:
        raise AssertionError("backend='triton' on CPU tensors without the interpreter did not raise")

    # The interpreter switched on after the kernels were loaded for the GPU: refused, with the reason.
    import fastelbo.kernels
    os.environ["TRITON_INTERPRET"] = "1"
    ok, why = _backend.available("triton", "cpu")
    assert not ok and "before importing fastelbo" in why, why
    print("OK")
""")

_NO_TRITON = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # import triton -> ImportError, as where it is not installed
    import torch
    import fastelbo
    from fastelbo import _backend

    for device_type in ("cpu", "cuda"):
        ok, why = _backend.available("triton", device_type)
        assert not ok and "pip install triton" in why, why
    try:
        fastelbo.gaussian_kl(torch.randn(2, 3), torch.randn(2, 3), backend="triton")
    except RuntimeError as e:
        assert "pip install triton" in str(e) and "backend='cpu'" in str(e), str(e)
        print("ERROR:", e)
    else:
        raise AssertionError("backend='triton' without triton did not raise")
    print("OK")
""")


@pytest.mark.parametrize("script", [_NO_INTERPRETER, _NO_TRITON], ids=["no-interpreter", "no-triton"])
def test_triton_backend_unavailable_is_a_clear_error(script):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTELBO_BACKEND")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU-only machine, also where a GPU is present
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


def test_auto_picks_triton_for_cuda_tensors():
    if not torch.cuda.is_available():
        assert _backend._BY_DEVICE["cuda"][0] == "triton"
        pytest.skip("no CUDA device: checked the candidate list only")
    assert _backend.resolve("auto", "cuda") == "triton"


# ---------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------
def _vae_loss(x, recon, mu, lv, obs):
    z = fastelbo.rsample(mu, lv, seed=1234, backend="triton")
    terms = fastelbo.elbo(recon, x, mu, lv, likelihood="gaussian", obs_logvar=obs, prior_mu=0.1, prior_logvar=-0.3,
                          beta=0.5, backend="triton")
    kl = fastelbo.gaussian_kl(mu, lv, backend="triton")
    ll = torch.ops.fastelbo.triton_bernoulli_log_prob(recon, x.clamp(0, 1), False)
    return -terms.elbo.sum() + (z * z).sum() + kl.sum() - ll.sum()


@needs_triton
@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    """No graph break (fullgraph=True), same values and gradients as eager, two sizes with dynamic=True.
    On GPUs Inductor sees the kernels themselves (triton_op); under the interpreter the ops stay whole
    in the graph (kernels/_launch.py opaque_under_interpreter)."""
    gen = _gen(9)
    compiled = torch.compile(_vae_loss, fullgraph=True, dynamic=True)
    for B, DX, DZ in ((4, 11, 3), (6, 11, 3)):
        x, recon, mu, lv = _t((B, DX), gen, 0, 1), _t((B, DX), gen), _t((B, DZ), gen), _t((B, DZ), gen, -1, 1)
        obs = _t((DX,), gen, -1, 1)
        results = []
        for fn in (_vae_loss, compiled):
            ins = [t.clone().requires_grad_(True) for t in (recon, mu, lv, obs)]
            loss = fn(x, ins[0], ins[1], ins[2], ins[3])
            loss.backward()
            results.append((loss.detach(), [t.grad for t in ins]))
        (l0, g0), (l1, g1) = results
        torch.testing.assert_close(l1, l0, msg=lambda m: f"B={B}: loss {m}")
        for name, a, b in zip(("recon", "mu", "logvar", "obs_logvar"), g1, g0):
            torch.testing.assert_close(a, b, msg=lambda m: f"B={B}: d{name} {m}")


# ---------------------------------------------------------------------------
# Registration and tuning tables (no kernel runs).
# ---------------------------------------------------------------------------
def _args(schema):
    return [(a.name, str(a.type).replace("List[bool]", "bool[]")) for a in schema.arguments]


@needs_triton
def test_ops_namespace_mirrors_torch_ops_fastelbo():
    """impl("triton") returns fastelbo.kernels.OPS: every name of the C++ op set that the API calls,
    with the same arguments (bool[N] masks become bool[]) and the same number of results."""
    from fastelbo.kernels import OPS

    for name, packet in vars(OPS).items():
        ours, theirs = packet.default._schema, getattr(torch.ops.fastelbo, name).default._schema
        assert [a for a, _ in _args(ours)] == [a for a, _ in _args(theirs)], name
        assert [str(a.type).split("[")[0] for a in ours.arguments] == \
            [str(a.type).split("[")[0] for a in theirs.arguments], name
        assert [a.default_value for a in ours.arguments] == [a.default_value for a in theirs.arguments], name
        assert len(ours.returns) == len(theirs.returns), name


def test_autotune_space_stays_in_the_tile_budget():
    """GPU configurations: at most 16 elements per thread per operand for the row kernels (8 in float64)
    and 8 for the Philox kernels (the densest cases test_triton_cubin.py compiles without spills)."""
    pytest.importorskip("triton")
    from fastelbo.kernels import _launch

    for block in (1, 2, 8, 32, 128, 1024, 2048):
        for fp64 in (0, 1):
            kept = _launch.prune_row_configs(_launch._row_configs(), block, fp64)
            assert 1 <= len(kept) <= 6, (block, kept)
            for c in kept:
                per_thread = c.kwargs["ROWS"] * block / (32 * c.num_warps)
                assert per_thread <= (8 if fp64 else 16), (block, fp64, c)
    for n in (1, 100, 10**6):
        for c in _launch.prune_flat_configs(_launch._flat_configs(), n):
            assert c.kwargs["BLOCK"] % 4 == 0 and c.kwargs["BLOCK"] / (32 * c.num_warps) <= 8
    assert _launch.block_for(3 * 256 * 256) == (_launch.INTERPRET_MAX_BLOCK if _launch.INTERPRET
                                               else _launch.GPU_MAX_BLOCK)
    assert math.log2(_launch.block_for(785)).is_integer()
