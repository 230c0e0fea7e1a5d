"""The ``fastelbo`` command line (build, check, info), the README's set-up
commands and .ci/run, which must run the README's test command verbatim."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastelbo
from fastelbo import _build, reference
from fastelbo.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--shape", "8x50x6"]  # odd sizes, fast
OPS = ("rsample", "gaussian_kl", "gaussian_kl (prior)", "bernoulli_log_prob", "gaussian_log_prob",
       "elbo (bernoulli)", "elbo (gaussian)", "rsample (K=4)", "elbo (K=4 samples)", "iwae_bound (K=4)", "free_bits_kl")


def table_rows(text: str) -> list[list[str]]:
    """Rows of the check/info table: cells split on ' | ' (header and rule excluded)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(" | ")]
        if len(cells) >= 4 and cells[0] in ("cpu", "triton", "cuda", "reference"):
            rows.append(cells)
    return rows


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------
# argument handling
# ---------------------------------------------------------------------------
def test_no_command_prints_help_and_exits_2(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 2
    for name in ("check", "build", "info"):
        assert name in out


@pytest.mark.parametrize("argv", [["--bogus"], ["nosuch"], ["check", "--bogus"], ["check", "--dtype", "int8"],
                                  ["check", "--device", "tpu"], ["check", "--backend", "reference"],
                                  ["build", "--bogus"], ["info", "extra"], ["check", "--shape", "8x50"],
                                  ["check", "--dtype", "float32,int8"], ["bench", "--device", "tpu"],
                                  ["bench", "--dtype", "float8"]])
def test_bad_arguments_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage: fastelbo" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_check_device_cuda_without_cuda_is_one_clear_line(capsys):
    code, _, err = run_cli(capsys, "check", "--device", "cuda")
    assert code == 2
    assert err.strip().count("\n") == 0 and "cuda" in err


def test_console_entry_point_exit_status():
    """The module runs as a program and argparse errors exit 2 there too."""
    proc = subprocess.run([sys.executable, "-m", "fastelbo.cli", "--bogus"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "usage: fastelbo" in proc.stderr


# ---------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------
def test_build(capsys):
    code, out, err = run_cli(capsys, "build", "--no-cuda")
    assert code == 0, err
    assert str(_build.cache_root()) in out
    assert re.search(r"ready in \d+\.\d s", out)
    ok, where = _build.cpu_extension_status()
    assert ok and where in out
    assert "CUDA" not in out


@pytest.mark.skipif(not hasattr(_build, "cuda_compatibility"), reason="this fastelbo has no CUDA kernels")
def test_build_says_why_the_cuda_kernels_are_not_built(capsys, monkeypatch):
    monkeypatch.setattr(_build, "cuda_compatibility", lambda: (False, "no nvcc in this test"))
    code, out, err = run_cli(capsys, "build")
    assert code == 0, err
    assert "CUDA kernels: not built (no nvcc in this test)" in out


def test_build_failure_exits_1_with_the_error(capsys, monkeypatch):
    def broken():
        raise _build.BuildError("building fastelbo's C++ CPU kernels failed: no g++ (apt-get install g++)")

    monkeypatch.setattr(_build, "load_cpu_extension", broken)
    code, _, err = run_cli(capsys, "build")
    assert code == 1
    assert "apt-get install g++" in err


# ---------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------
def test_check_passes_on_cpu_and_lists_the_other_backends(capsys):
    code, out, err = run_cli(capsys, "check", *SMALL)
    assert code == 0, out + err
    rows = table_rows(out)
    cpu = {r[2]: r[-1] for r in rows if r[:2] == ["cpu", "cpu"]}
    assert cpu == {op: "ok" for op in OPS}, out
    for backend in ("triton", "cuda"):
        statuses = [r[-1] for r in rows if r[0] == backend]
        assert statuses, f"{backend} is not listed:\n{out}"
        for status in statuses:
            assert status == "ok" or re.match(r"(unavailable|skipped): \S", status), status
    if not torch.cuda.is_available():
        assert all(r[-1].startswith("unavailable: ") for r in rows if r[0] == "cuda"), out
    assert "tolerance (float32): |out - ref| <= max(0.0001 * max(1, |ref|), 2 * max|torch - ref|)" in out


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
def test_check_other_dtypes(capsys, dtype):
    code, out, err = run_cli(capsys, "check", "--dtype", dtype, "--backend", "cpu", "--seed", "3", *SMALL)
    assert code == 0, out + err
    rows = table_rows(out)
    assert {r[0] for r in rows} == {"cpu"}
    assert [r[-1] for r in rows if r[:2] == ["cpu", "cpu"]] == ["ok"] * len(OPS)
    assert f"tolerance ({dtype})" in out


def test_check_fails_on_a_wrong_result(capsys, monkeypatch):
    """A backend disagreeing with the reference is a FAIL and exit status 1
    (here the reference's KL is made wrong, which the kernels then disagree with)."""
    true_kl = reference.gaussian_kl
    monkeypatch.setattr(reference, "gaussian_kl", lambda *a, **k: true_kl(*a, **k) * 1.01)
    code, out, _ = run_cli(capsys, "check", "--backend", "cpu", *SMALL)
    assert code == 1
    status = {r[2]: r[-1] for r in table_rows(out) if r[0] == "cpu"}
    assert status["gaussian_kl"].startswith("FAIL: out[")
    assert status["bernoulli_log_prob"] == "ok"
    assert "FAILED" in out


# The IWAE gradients at Dx = 784 are ill-conditioned in float32 (tolerance rule in check.py): there
# the old per-value 1e-4 failed the correct C++ kernels on 3 of 20 seeds (2, 3 and 5) at this shape.
ILL_CONDITIONED = ["--shape", "16x784x32"]
SEEDS = range(20)


def _check_case_rows(backend: str, seed: int, shape) -> dict[str, str]:
    """check's own comparison (make_cases, run_case under FASTELBO_STRICT) for a backend the command
    line does not list: op -> "ok" or "FAIL: ..."."""
    from fastelbo.commands import check

    statuses = {}
    with check._strict():
        for case in check.make_cases(*shape, seed=seed):
            res = check.run_case(case, backend, "cpu", torch.float32, seed)
            statuses[case.name] = "ok" if res.failure is None else f"FAIL: {res.failure}"
    return statuses


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda-emulated"])
def test_check_passes_over_20_seeds(capsys, backend):
    """A correct install passes `fastelbo check` whatever the seed: the tolerance rule holds for
    correct float32 kernels (the default seed failed before on iwae_bound's dx). cpu at an
    ill-conditioned shape, the interpreted Triton kernels at check's own CPU shape, the emulated CUDA
    kernels (not a command-line backend: check's comparison run directly) at a small one."""
    from fastelbo import _backend

    ok, why = _backend.available(backend, "cpu")
    if not ok:
        pytest.skip(f"backend {backend!r} on cpu: {why}")
    failed = {}
    for seed in SEEDS:
        if backend == "cuda-emulated":
            statuses = _check_case_rows(backend, seed, (8, 40, 6))
        else:
            argv = ILL_CONDITIONED if backend == "cpu" else SMALL
            code, out, err = run_cli(capsys, "check", "--backend", backend, "--device", "cpu", "--seed", str(seed),
                                     *argv)
            statuses = {r[2]: r[-1] for r in table_rows(out) if r[:2] == [backend, "cpu"]}
            assert code == 0 or any(s != "ok" for s in statuses.values()), out + err
        assert len(statuses) == len(OPS), statuses
        failed.update({f"seed {seed}: {op}": s for op, s in statuses.items() if s != "ok"})
    assert not failed, failed


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient comes back 1e-3 too large (relative): a subtle backward bug."""

    @staticmethod
    def forward(t):
        return t.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad * (1 + 1e-3)


def test_check_still_fails_a_gradient_off_by_1e3_relative(capsys, monkeypatch):
    """The baseline part of the rule leaves real bugs visible: every input gradient of every op
    scaled by 1 + 1e-3 is a FAIL on a gradient for every op, ill-conditioned IWAE included."""
    from fastelbo.commands import check

    true_api = check._backend_api

    def perturbed(backend):
        api = true_api(backend)

        def wrap(value):
            return _ScaleGrad.apply(value) if isinstance(value, torch.Tensor) else value

        return lambda name: (lambda *args, **kw: api(name)(*map(wrap, args), **{k: wrap(v) for k, v in kw.items()}))

    monkeypatch.setattr(check, "_backend_api", perturbed)
    code, out, _ = run_cli(capsys, "check", "--backend", "cpu", *ILL_CONDITIONED)
    assert code == 1
    status = {r[2]: r[-1] for r in table_rows(out) if r[0] == "cpu"}
    assert set(status) == set(OPS), out
    for op, s in status.items():
        assert s.startswith("FAIL: d"), f"{op}: {s}"


def test_check_never_reports_an_unavailable_backend_as_ok(capsys, monkeypatch):
    import fastelbo._backend as backend_module

    monkeypatch.setattr(backend_module, "available", lambda name, device: (False, f"{name} switched off"))
    code, out, _ = run_cli(capsys, "check", "--device", "cpu", *SMALL)
    assert code == 0
    rows = table_rows(out)
    assert rows and all(r[-1] != "ok" for r in rows)
    assert [r[-1] for r in rows if r[:2] == ["cpu", "cpu"]] == ["unavailable: cpu switched off"]


def test_check_build_failure_exits_1(capsys, monkeypatch):
    def broken():
        raise _build.BuildError("no compiler (install g++)")

    monkeypatch.setattr(_build, "load_cpu_extension", broken)
    code, out, _ = run_cli(capsys, "check", "--backend", "cpu", *SMALL)
    assert code == 1
    assert "install g++" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastelbo {fastelbo.__version__}"


def _options(command: str) -> dict:
    import argparse
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(f"fastelbo.commands.{command}").add_arguments(parser)
    return {s: a for a in parser._actions for s in a.option_strings}


def test_check_and_bench_share_option_names_and_forms():
    # Issue 21: check --dtype took one dtype, bench --dtypes a list; check --batch/--x-dim/--z-dim against
    # bench --shapes BxDxxDz; bench --device free text against check's choices.
    check, bench = _options("check"), _options("bench")
    for name in ("--dtype", "--dtypes", "--shape", "--shapes", "--device"):
        assert name in check and name in bench, name
        assert check[name].dest == bench[name].dest and check[name].metavar == bench[name].metavar, name
    assert check["--device"].choices == bench["--device"].choices == ("auto", "cpu", "cuda")
    assert check["--device"].default == bench["--device"].default == "auto"
    for hidden in ("--batch", "--x-dim", "--z-dim"):  # 0.1's spelling still parses, not advertised
        assert check[hidden].help == "==SUPPRESS=="


def test_check_takes_lists_of_dtypes_and_shapes(capsys):
    code, out, err = run_cli(capsys, "check", "--backend", "cpu", "--device", "cpu", "--dtype", "float32,float64",
                             "--shape", "8x50x6,3x7x2")
    assert code == 0, out + err
    heads = [ln for ln in out.splitlines() if ln.startswith("fastelbo check: dtype")]
    assert [h.split(",")[0] for h in heads] == ["fastelbo check: dtype float32"] * 2 + ["fastelbo check: dtype float64"] * 2
    assert "shape 8x50x6" in heads[0] and "shape 3x7x2" in heads[1]
    assert "FAIL" not in out


def test_check_old_size_options_still_work(capsys):
    code, out, err = run_cli(capsys, "check", "--backend", "cpu", "--device", "cpu", "--batch", "8", "--x-dim", "50",
                             "--z-dim", "6")
    assert code == 0, out + err
    assert "shape 8x50x6" in out
    code, _, err = run_cli(capsys, "check", "--shape", "8x50x6", "--batch", "3")
    assert code == 2 and "not --shape with --batch" in err


# ---------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------
def test_info(capsys):
    code, out, err = run_cli(capsys, "info")
    assert code == 0, err
    for needle in (fastelbo.__version__, torch.__version__, str(_build.cache_root()), "triton", "numpy", "nvcc",
                   "compiler", "CPU"):
        assert needle in out, needle
    # the ninja that builds (issue 21: info named the environment's even when another one built)
    from fastelbo import _toolchain

    ninja_line = next(ln for ln in out.splitlines() if ln.startswith("ninja"))
    assert str(_toolchain.ninja().path) in ninja_line and _toolchain.ninja().version in ninja_line
    rows = table_rows(out)
    assert {(r[0], r[1]) for r in rows} == {(b, d) for b in ("cpu", "triton", "cuda", "reference")
                                           for d in ("cpu", "cuda")}
    for r in rows:
        assert r[2] in ("yes", "no")
        if r[2] == "no":
            assert r[3], f"no reason given for {r[:2]}"
    assert ["reference", "cpu", "yes"] in [r[:3] for r in rows]


def test_info_runs_as_a_program():
    proc = subprocess.run([sys.executable, "-m", "fastelbo.cli", "info"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "backend" in proc.stdout and "reference" in proc.stdout


# ---------------------------------------------------------------------------
# README set-up commands and .ci/run
# ---------------------------------------------------------------------------
def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_has_exactly_two_setup_commands():
    assert readme_commands() == ["pip install '.[demo]' && fastelbo demo",
                                 "pip install -e '.[test,demo]' && python -m pytest -q"]


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text()
    lines = ci.splitlines()
    assert any(test_command in line and not line.lstrip().startswith("#") for line in lines), \
        f".ci/run does not run the README's test command {test_command!r}"
    install = ci.index("python -m pip install torch==2.13.0")
    assert install < ci.index(test_command), "torch must be installed before the tests run"
    assert "set -euo pipefail" in ci


def test_ci_run_is_an_executable_bash_script():
    path = ROOT / ".ci" / "run"
    assert os.access(path, os.X_OK)
    assert path.read_text().startswith("#!/usr/bin/env bash")
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_ci_run_fails_when_a_test_fails(tmp_path):
    """The exit status of the test command is the script's, whatever follows it."""
    ci = (ROOT / ".ci" / "run").read_text()
    fake = tmp_path / "bin"
    fake.mkdir()
    # stand-ins for python and pip: installs succeed, pytest fails with status 1
    (fake / "pip").write_text("#!/bin/sh\nexit 0\n")
    (fake / "python").write_text('#!/bin/sh\nif [ "$2" = "pytest" ]; then exit 1; fi\nexit 0\n')
    for tool in ("pip", "python"):
        (fake / tool).chmod(0o755)
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    (repo / ".ci" / "run").write_text(ci)
    (repo / ".ci" / "run").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (fake / "python").write_text("#!/bin/sh\nexit 0\n")
    proc = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
