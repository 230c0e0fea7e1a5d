"""The GPU check (bench/gpu_check.sh, bench/gpucheck/), checked without a GPU.

What can be shown here: the dry run prints every stage with its command and
cap, and the caps fit the 8-minute budget; the runner stops a hanging stage
at its cap, keeps the other stages' results, skips what needed the hung one
and rewrites the report after every stage; the report writer turns the
stages' outputs (synthetic ones here) into report.json and report.md; the
compute-sanitizer log verdicts; which backend wins (winners.py); the test
selection and sharding of the pytest plugin, in a real pytest run; the
sanitizer script's op sweep, on the CPU backend; the benchmark plan's shapes
against the L2 cache; the install stage's fallback when pip cannot install
offline. What needs a GPU (the stages themselves) runs on one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from gpucheck import report, runner, sanitizer_log, select_tests, stages, winners  # noqa: E402


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "bench") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


# ---------------------------------------------------------------------------
# The plan and the dry run
# ---------------------------------------------------------------------------
def test_dry_run_prints_every_stage_command_and_cap(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), "--dry-run", "--cores", "16"],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    groups = stages.build_plan(stages.Paths(ROOT, out, tmp_path / "work"), 16)
    for g in groups:
        assert f"== group {g.name}: cap {g.cap_s:.0f} s" in text
        for st in g.stages:
            assert f"-- {st.name}: " in text
    assert sum(len(g.stages) for g in groups if g.name == "correctness") == 8 + 4  # 8 test shards, kernels, 3 tools
    assert "pip install --no-deps --no-build-isolation --no-index -e ." in text
    for tool in ("memcheck", "racecheck", "synccheck"):
        assert f"--tool {tool}" in text
    assert "-m gpucheck.bench_gpu" in text and "-p gpucheck.select_tests" in text
    assert "= 480 s of a 480 s budget" in text and "PROBLEM" not in text
    assert not out.exists(), "a dry run writes nothing"


def test_caps_fit_the_budget_and_names_are_unique(tmp_path):
    groups = stages.build_plan(stages.Paths(ROOT, tmp_path, tmp_path), 16)
    assert stages.planned_total(groups) <= stages.BUDGET_S == 480
    names = [s.name for g in groups for s in g.stages]
    assert len(names) == len(set(names)) and len(groups) == len({g.name for g in groups})
    for f in stages.TEST_FILES:
        assert (ROOT / f).is_file(), f


def test_dry_run_reports_caps_over_budget(tmp_path):
    groups = stages.build_plan(stages.Paths(ROOT, tmp_path, tmp_path), 4)
    lines = []
    assert runner.dry_run(stages.Paths(ROOT, tmp_path, tmp_path), groups, 300, 4, echo=lines.append) == 1
    assert any("PROBLEM: the caps sum to 480 s" in ln for ln in lines)


# ---------------------------------------------------------------------------
# The runner: caps, isolation, skips, the report after every stage
# ---------------------------------------------------------------------------
def test_runner_stops_a_hanging_stage_and_keeps_the_rest(tmp_path):
    out, py = tmp_path / "out", sys.executable
    show = ("import json, os; d = json.load(open(os.path.join(os.environ['GPUCHECK_OUT'], 'report.json'))); "
            "print('seen:', [s['status'] for s in d['stages'] if s['name'] == 'hang'])")
    groups = [
        stages.Group("first", 3.0, [
            stages.Stage("quick", [stages.PYTHON, "-c", "print('quick done')"], "exits at once"),
            stages.Stage("hang", [stages.PYTHON, "-c", "import time; print('hanging', flush=True); time.sleep(120)"],
                         "never ends"),
        ]),
        stages.Group("second", 6.0, [
            stages.Stage("after", [stages.PYTHON, "-c", show], "runs after the hang, reads the report"),
            stages.Stage("needs-hang", [stages.PYTHON, "-c", "print(1)"], "needs the hung stage", needs=("hang",)),
            stages.Stage("no-tool", ["/nonexistent/tool"], "a tool this machine lacks", skip_reason="no such tool"),
        ]),
    ]
    lines = []
    t0 = time.monotonic()
    r = runner.Runner(stages.Paths(ROOT, out, tmp_path / "work"), groups, budget_s=3 + 6 + stages.REPORT_RESERVE_S,
                      cores=2, python=py, echo=lines.append)
    rc = r.run()
    took = time.monotonic() - t0
    assert rc == 1
    status = {n: res["status"] for n, res in r.results.items()}
    assert status == {"quick": "ok", "hang": "timeout", "after": "ok", "needs-hang": "skipped", "no-tool": "skipped"}
    assert took < 3 + 6 + 5, f"the caps did not hold: {took:.1f} s"
    assert "seen: ['timeout']" in (out / "logs" / "after.log").read_text()  # the report was written before it ran
    assert "hanging" in (out / "logs" / "hang.log").read_text()
    doc = json.loads((out / "report.json").read_text())
    assert doc["meta"]["final"] and [s["name"] for s in doc["stages"]] == ["quick", "hang", "after", "needs-hang",
                                                                          "no-tool"]
    assert "stage hang: timeout" in "\n".join(doc["problems"])
    assert "needs stage 'hang', which is timeout" in r.results["needs-hang"]["reason"]
    assert "| hang | timeout |" in (out / "report.md").read_text()


def test_runner_marks_failed_builds_for_later_stages(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "build.json").write_text(json.dumps({"cpu": {"ok": True, "seconds": 1}, "cuda": {
        "ok": False, "error": "nvcc failed\nline 2"}}))
    r = runner.Runner(stages.Paths(ROOT, out, tmp_path), [], echo=lambda *_: None)
    r.results["build"] = {"status": "failed"}
    r._mark_build_failures()
    assert r.extra_env == {"GPUCHECK_CUDA_BUILD_FAILED": "nvcc failed"}
    (out / "build.json").unlink()  # stopped by its cap before writing: both marked
    r.extra_env.clear()
    r.results["build"] = {"status": "timeout"}
    r._mark_build_failures()
    assert set(r.extra_env) == {"GPUCHECK_CPU_BUILD_FAILED", "GPUCHECK_CUDA_BUILD_FAILED"}
    assert "timeout" in r.extra_env["GPUCHECK_CUDA_BUILD_FAILED"]


# ---------------------------------------------------------------------------
# compute-sanitizer logs
# ---------------------------------------------------------------------------
CLEAN = """\
========= COMPUTE-SANITIZER
========= ERROR SUMMARY: 0 errors
"""
OURS = """\
========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 16 bytes
=========     at void fastelbo::cuda::row_reduce_kernel<float, fastelbo::cuda::BernoulliTerm<float>>(...)+0x2c0
=========     by thread (31,0,0) in block (3,0,0)
=========     Address 0x7f12a0001000 is out of bounds
=========
========= Program hit cudaErrorInvalidValue (error 1) due to "invalid argument" on CUDA API call to cudaFuncGetAttributes.
=========     Saved host backtrace up to driver entry point at error
=========         Host Frame: [0x2dd6e0] in libcuda.so.1
=========
========= ERROR SUMMARY: 2 errors
"""
RACE = """\
========= COMPUTE-SANITIZER
========= Error: Race reported between Write access at void fastelbo::cuda::row_finalize_kernel<float>(...)+0x90
=========     and Read access at void fastelbo::cuda::row_finalize_kernel<float>(...)+0x120 [48 hazards]
=========
========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)
"""
CUT = """\
========= COMPUTE-SANITIZER
========= Invalid __global__ write of size 4 bytes
=========     at void at::native::vectorized_elementwise_kernel<4, ...>(...)+0x1a0
"""


def test_sanitizer_verdicts():
    clean = sanitizer_log.summarize(CLEAN, 0)
    assert clean["verdict"] == "clean" and clean["errors"] == 0 and clean["reports"] == 0
    ours = sanitizer_log.summarize(OURS, 86)
    assert ours["verdict"] == "errors" and ours["errors"] == 2
    assert (ours["fastelbo_reports"], ours["other_reports"]) == (1, 1)
    assert "row_reduce_kernel" in ours["first_fastelbo"][0] and "by thread (31,0,0)" in ours["first_fastelbo"][0]
    race = sanitizer_log.summarize(RACE, 86)
    assert race["verdict"] == "errors" and race["errors"] == 1 and race["fastelbo_reports"] == 1
    cut = sanitizer_log.summarize(CUT, None)
    assert cut["verdict"] == "incomplete" and not cut["finished"] and cut["other_reports"] == 1


# ---------------------------------------------------------------------------
# Which backend wins
# ---------------------------------------------------------------------------
def _rows(op, shape, nbytes, triton, cuda, pass_="fwd+bwd"):
    key = f"{op}/{pass_}/{shape}/float32"
    base = {"key": key, "op": op, "pass": pass_, "shape": shape, "shape_family": "x", "dtype": "float32",
            "min_bytes": nbytes}
    return [dict(base, impl="fastelbo-triton", rounds_s=triton, median_s=sorted(triton)[len(triton) // 2]),
            dict(base, impl="fastelbo-cuda", rounds_s=cuda, median_s=sorted(cuda)[len(cuda) // 2]),
            dict(base, impl="eager", rounds_s=[1.0] * len(cuda), median_s=1.0)]


def test_winners_per_case_class_and_family():
    l2 = 50 << 20
    results = (_rows("step", "65536x784x64", 640e6, [2.0, 2.2, 2.1], [1.0, 1.1, 1.0])  # cuda 2x faster, DRAM
               + _rows("step", "4096x784x64", 39e6, [1.0, 1.0, 1.0], [1.02, 0.99, 1.01])  # tie, L2-resident
               + _rows("step", "32x64x8", 9e3, [1.0, 1.0, 1.0], [3.0, 3.0, 3.0])  # triton wins launch-bound
               + _rows("kl", "65536x784x512", 537e6, [1.0, 1.0, 1.0], [1.5, 1.6, 1.4])  # triton, DRAM
               + _rows("kl", "4096x784x64", 80e6, [2.0, 2.0, 2.0], [1.0, 1.0, 1.0])  # cuda, L2-edge (ignored)
               + _rows("elbo", "65536x784x64", 640e6, [1.0, 1.0, 1.0], [2.0, 2.0, 2.0])  # triton, DRAM
               + _rows("elbo", "4096x784x64", 39e6, [2.0, 2.0, 2.0], [1.0, 1.0, 1.0]))  # cuda: mixed
    doc = {"machine": {"l2_bytes": l2}, "results": results}
    rows = {(r["op"], r["shape"]): r for r in winners.case_winners(doc)}
    assert len(rows) == 7
    assert rows[("step", "65536x784x64")]["class"] == "DRAM" and rows[("step", "65536x784x64")]["winner"] == "cuda"
    assert rows[("step", "65536x784x64")]["triton_over_cuda"] == pytest.approx(2.0)
    assert rows[("step", "4096x784x64")]["winner"] == "tie" and rows[("step", "4096x784x64")]["class"] == "L2-resident"
    assert rows[("step", "32x64x8")]["class"] == "launch-bound" and rows[("step", "32x64x8")]["winner"] == "triton"
    assert rows[("kl", "4096x784x64")]["class"] == "L2-edge"
    rule = {f["op"]: f for f in winners.family_rule(list(rows.values()), "triton")}
    assert rule["step"]["measured"] == "cuda" and rule["step"]["action"] == "reorder: cuda first"
    assert rule["kl"]["measured"] == "triton" and rule["kl"]["action"] == "keep"
    assert rule["elbo"]["measured"] == "mixed"


def test_winners_rounds_are_paired():
    # Medians tie (1.0 vs 1.0), but round by round triton is always 2x slower: the paired ratio says so.
    assert winners.paired_ratio([2.0, 1.0, 1.0, 2.0, 0.5], [1.0, 0.5, 0.5, 1.0, 0.25]) == pytest.approx(2.0)
    assert winners.verdict(1.04) == "tie" and winners.verdict(1.06) == "cuda" and winners.verdict(0.9) == "triton"


# ---------------------------------------------------------------------------
# The pytest plugin: which cases, which shard, what is written
# ---------------------------------------------------------------------------
class _Backend(tuple):
    def __new__(cls, name, device):
        self = super().__new__(cls, (name, device))
        self.name, self.device = name, device
        return self


def _item(file, name, cid=None, **params):
    callspec = SimpleNamespace(params=params, id=cid) if cid is not None else None
    item = SimpleNamespace(fspath=f"/x/tests/{file}", name=f"{name}[{cid}]" if cid else name, originalname=name,
                           nodeid=f"tests/{file}::{name}" + (f"[{cid}]" if cid else ""))
    if callspec is not None:
        item.callspec = callspec
    return item


def test_selection_keeps_cuda_cases_only():
    keep = select_tests.keep
    assert keep(_item("test_accuracy.py", "t", "triton-f32", fused=_Backend("triton", "cuda")))
    assert keep(_item("test_accuracy.py", "t", "cuda-f32", fused=_Backend("cuda", "cuda")))
    assert not keep(_item("test_accuracy.py", "t", "cpu-f32", fused=_Backend("cpu", "cpu")))
    assert not keep(_item("test_accuracy.py", "t", "cuda-emulated-f32", fused=_Backend("cuda-emulated", "cpu")))
    assert not keep(_item("test_accuracy.py", "t", "triton-f32", fused=_Backend("triton", "cpu")))  # interpreter
    assert keep(_item("test_integration_autocast.py", "t", "cuda-f16", device="cuda"))
    assert not keep(_item("test_integration_autocast.py", "t", "cpu-bf16", device="cpu"))
    assert keep(_item("test_bad_input.py", "t", "kl-cuda-cpu", fn=None))
    assert not keep(_item("test_bad_input.py", "t", "beta-str", fn=None))
    assert keep(_item("test_triton.py", "test_long_rows_rsample"))
    assert keep(_item("test_launch_geometry.py", "t", "split_rows", kind="split_rows"))
    assert not keep(_item("test_rng.py", "test_numpy_philox_known_answers"))


def test_shards_partition_keep_order_and_groups():
    items = []
    for fn in ("a", "b", "c", "d", "e"):
        for be in ("triton", "cuda"):
            for dt in ("f32", "f64", "f16"):
                items.append(_item("test_accuracy.py", fn, f"{be}-{dt}", fused=_Backend(be, "cuda")))
    shards = [select_tests.shard(items, k, 4) for k in range(1, 5)]
    ids = [it.nodeid for s in shards for it in s]
    assert sorted(ids) == sorted(it.nodeid for it in items) and len(ids) == len(set(ids))
    for s in shards:
        assert s, "every shard gets work"
        idx = [items.index(it) for it in s]
        assert idx == sorted(idx), "a shard keeps the order of collection"
    owner = {it.nodeid: k for k, s in enumerate(shards) for it in s}
    by_group: dict = {}
    for it in items:  # one (backend, function, dtype) group: one shard
        by_group.setdefault(select_tests.group_key(it), set()).add(owner[it.nodeid])
    assert len(by_group) == 30 and all(len(v) == 1 for v in by_group.values())
    assert select_tests.parse_shard("2/8") == (2, 8) and select_tests.parse_shard(None) == (1, 1)
    with pytest.raises(ValueError, match="k/N"):
        select_tests.parse_shard("9/8")


def test_plugin_in_a_pytest_run(tmp_path):
    (tmp_path / "test_fake.py").write_text(textwrap.dedent("""
        import pytest
        from typing import NamedTuple

        class Backend(NamedTuple):
            name: str
            device: str

        @pytest.mark.parametrize("fused", [Backend("cpu", "cpu"), Backend("triton", "cuda"), Backend("cuda", "cuda")],
                                 ids=["cpu", "triton", "cuda"])
        @pytest.mark.parametrize("n", [1, 2])
        def test_op(fused, n):
            assert n == 1, "n must be 1"

        def test_cpu_only():
            pass
    """))
    results = tmp_path / "r" / "shard.jsonl"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "gpucheck.select_tests", "-p", "no:cacheprovider",
                           "-q", str(tmp_path / "test_fake.py")], cwd=tmp_path, capture_output=True, text=True,
                          env=_env(GPUCHECK_RESULTS=str(results), GPUCHECK_SHARD="1/1"), timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the n == 2 cases fail
    recs = [json.loads(ln) for ln in results.read_text().splitlines()]
    sel = next(r for r in recs if r.get("event") == "selected")
    assert (sel["selected"], sel["collected"]) == (4, 7)
    calls = {r["nodeid"].split("::")[1]: (r["outcome"], r["backend"]) for r in recs if r.get("when") == "call"}
    assert calls == {"test_op[1-triton]": ("passed", "triton"), "test_op[1-cuda]": ("passed", "cuda"),
                     "test_op[2-triton]": ("failed", "triton"), "test_op[2-cuda]": ("failed", "cuda")}
    failed = next(r for r in recs if r.get("outcome") == "failed")
    assert "n must be 1" in failed["message"]
    assert recs[-1]["event"] == "finished" and recs[-1]["exitstatus"] == 1


# ---------------------------------------------------------------------------
# The report writer, from synthetic stage outputs
# ---------------------------------------------------------------------------
def _fake_out(out: Path) -> dict:
    (out / "tests").mkdir(parents=True)
    (out / "sanitizer").mkdir()
    (out / "bench").mkdir()
    (out / "logs").mkdir()
    (out / "install.json").write_text(json.dumps({"ok": True, "how": "venv", "fastelbo": "/r/fastelbo/__init__.py"}))
    (out / "versions.json").write_text(json.dumps({
        "python": "3.12.3", "packages": {"triton": "3.6.0"}, "torch": {"version": "2.11.0", "cuda": "13.0"},
        "gpu": {"cuda_available": True, "name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "sms": 132,
                "l2_bytes": 50 << 20}, "checkout": {"commit": "abc1234"}}))
    (out / "build.json").write_text(json.dumps({"cpu": {"ok": True, "seconds": 41.0},
                                                "cuda": {"ok": True, "seconds": 77.5}}))
    lines = [{"event": "selected", "selected": 5},
             {"nodeid": "t.py::a[triton-f32]", "when": "call", "outcome": "passed", "backend": "triton"},
             {"nodeid": "t.py::a[cuda-f32]", "when": "call", "outcome": "failed", "backend": "cuda",
              "message": "x = 1\nE   AssertionError: drecon (torch.float32): 3/91 values out of tolerance\nmore"},
             {"nodeid": "t.py::b[cuda-f64]", "when": "setup", "outcome": "skipped", "backend": "cuda",
              "message": "needs two GPUs"}]
    (out / "tests" / "shard-1.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"nodeid": "t.py::c')
    (out / "sanitizer" / "memcheck.log").write_text(CLEAN)
    (out / "sanitizer" / "racecheck.log").write_text(RACE)
    (out / "sanitizer" / "kernels.json").write_text(json.dumps({
        "expected": ["map_kernel", "row_reduce_kernel"], "launches_per_kernel": {"map_kernel": 40,
                                                                                 "row_reduce_kernel": 0},
        "missing": ["row_reduce_kernel"]}))
    bench = {"machine": {"l2_bytes": 50 << 20}, "copy_bandwidth": {"GBps": 3000.0},
             "implementations": ["eager", "compile", "fastelbo-cuda", "fastelbo-triton"],
             "auto_cuda": {"order": ["triton", "cuda"], "chosen": "triton"},
             "cases": [{"key": "step/fwd+bwd/65536x784x64/float32", "status": "ok"},
                       {"key": "kl/fwd+bwd/4096x784x64/float32", "status": "not run: out of time"}],
             "results": [dict(r, shape_family="dram", GBps=2500.0, pct_copy=83.0, speedup_vs_eager=9.5,
                              speedup_vs_compile=2.5, peak_bytes=3 << 20)
                         for r in _rows("step", "65536x784x64", 640e6, [2e-3] * 3, [1e-3] * 3)]}
    (out / "bench" / report.BENCH_JSON).write_text(json.dumps(bench))
    groups = stages.build_plan(stages.Paths(ROOT, out, out / "work"), 16)
    results = {"install": {"status": "ok", "seconds": 6.0, "cap_s": 30},
               "build": {"status": "ok", "seconds": 80.0, "cap_s": 150},
               "tests-1": {"status": "timeout", "seconds": 140.0, "cap_s": 140, "log": str(out / "logs" / "tests-1.log")},
               "memcheck": {"status": "ok", "rc": 0}, "racecheck": {"status": "failed", "rc": 86},
               "synccheck": {"status": "skipped", "reason": "compute-sanitizer not found"},
               "bench": {"status": "ok", "seconds": 120.0, "cap_s": 130}}
    return {"groups": groups, "results": results}


def test_report_from_synthetic_outputs(tmp_path):
    out = tmp_path / "out"
    fake = _fake_out(out)
    report.write(out, fake["groups"], fake["results"], {"started": "now", "elapsed_s": 400.0, "budget_s": 480.0,
                                                        "cores": 16, "final": True})
    doc = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    t = doc["tests"]
    assert t["per_backend"] == {"cuda": {"failed": 1, "skipped": 1}, "triton": {"passed": 1}}
    assert t["not_reached"] == 2 and t["failures"][0]["line"].startswith("AssertionError: drecon")
    assert doc["sanitizer"]["memcheck"]["verdict"] == "clean" and doc["sanitizer"]["racecheck"]["verdict"] == "errors"
    assert doc["bench"]["rule"][0]["action"] == "reorder: cuda first"
    probs = "\n".join(doc["problems"])
    for needle in ("stage tests-1: timeout", "tests: 1 failed", "2 of 5 selected cases not reached",
                   "racecheck: errors", "stage synccheck: skipped (compute-sanitizer not found)",
                   "never launched by the sanitizer script: row_reduce_kernel",
                   "backend cuda skipped more cases"):
        assert needle in probs, needle
    for needle in ("NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, L2 50 MiB)", "| tests-1 | timeout |", "1 failed",
                   "| build | ok | 80.0 | 150 | cpu built in 41.0 s; cuda built in 77.5 s |",
                   "First racecheck report in a fastelbo kernel", "row_finalize_kernel",
                   "NEVER LAUNCHED: row_reduce_kernel", "Copy bandwidth 3000 GB/s",
                   "| step/fwd+bwd/65536x784x64/float32 | fastelbo-cuda | 1.000 ms | 2500 | 83 | 9.50x | 2.50x | 3.0 MiB |",
                   "| step | - | - | - | cuda | cuda | reorder: cuda first |", "1 cases timed, 0 failed, 1 not run"):
        assert needle in md, needle


def test_report_survives_missing_and_broken_files(tmp_path):
    out = tmp_path / "out"
    (out / "bench").mkdir(parents=True)
    (out / "bench" / report.BENCH_JSON).write_text('{"results": [')  # cut mid-write
    (out / "build.json").write_text("{")
    groups = stages.build_plan(stages.Paths(ROOT, out, out / "work"), 4)
    report.write(out, groups, {"install": {"status": "failed", "reason": "pip"}}, {"budget_s": 480.0})
    doc = json.loads((out / "report.json").read_text())
    assert doc["bench"] is None and doc["build"] is None and doc["tests"] is None
    assert "stage install: failed (pip)" in doc["problems"]
    assert "IN PROGRESS" in (out / "report.md").read_text()


# ---------------------------------------------------------------------------
# The stage scripts that can run here
# ---------------------------------------------------------------------------
def test_sanitizer_script_sweeps_every_op_on_the_cpu_backend():
    proc = subprocess.run([sys.executable, "-m", "gpucheck.sanitize_ops", "--device", "cpu", "--backend", "cpu",
                           "--sizes", "small"], cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    n = 4 * 4 * 3 * 9  # dtypes x shapes x layouts x op cases (philox_noise only on CUDA)
    assert f"{n} of {n} cases ran" in proc.stdout


def test_sanitizer_script_knows_every_cuda_kernel():
    from gpucheck import sanitize_ops

    names = sanitize_ops.expected_kernels()
    text = "".join(p.read_text() for p in (ROOT / "csrc" / "cuda").glob("*") if p.suffix in (".cu", ".h"))
    assert len(names) == text.count("FASTELBO_GLOBAL void") >= 7
    assert {"map_kernel", "row_reduce_kernel", "row_finalize_kernel", "philox_noise_kernel"} <= set(names)


def test_bench_plan_covers_every_op_and_keeps_bandwidth_cases_out_of_l2():
    from fastelbo.bench import cases as C
    from gpucheck import bench_gpu

    plan = bench_gpu.plan()
    assert plan[0].key == "step/fwd+bwd/65536x784x64/float32"
    assert {c.op for c in plan} == set(C.OPS)
    h100_l2 = 50 << 20
    for case in plan:
        cls = winners.shape_class(case.min_bytes(), h100_l2)
        if case.shape.family.startswith("dram"):
            assert case.min_bytes() >= 5 * h100_l2 and cls == "DRAM", case.key
    target = [c for c in plan if c.shape == C.TARGET and c.op == "step"]
    assert target and winners.shape_class(target[0].min_bytes(), h100_l2) == "L2-resident"


def test_install_falls_back_to_an_import_finder(tmp_path):
    from gpucheck import install

    res = install.install(ROOT, tmp_path / "venv", pip_install=("-m", "pip", "install", "--not-an-option"))
    assert res["ok"], res
    assert res["how"].startswith("venv, import finder")
    assert res["fastelbo_kernels"] == str(ROOT / "kernels" / "__init__.py")
    proc = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c",
                           "import fastelbo.csrc, fastelbo.kernels; print(fastelbo.csrc.__file__)"],
                          cwd="/", capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == str(ROOT / "csrc" / "__init__.py"), proc.stderr


@pytest.mark.slow
def test_bench_stage_runs_its_cases_on_the_cpu(tmp_path):
    """The bench stage's own code (plan loop, document, table, plot, profiles) on two tiny CPU cases."""
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "gpucheck.bench_gpu", "--out", str(out), "--device", "cpu",
                           "--budget-s", "300"], cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / report.BENCH_JSON).read_text())
    assert [c["status"] for c in doc["cases"]] == ["ok", "ok"]
    impls = {r["impl"] for r in doc["results"] if "median_s" in r}
    assert {"eager", "compile", "fastelbo-cpu"} <= impls
    assert (out / report.BENCH_PNG).read_bytes()[:4] == b"\x89PNG"
    assert "fastelbo-cpu" in (out / "table.txt").read_text()
    assert "step/fwd+bwd/32x64x8/float32 fastelbo-cpu" in (out / "profile-step.txt").read_text()


# ---------------------------------------------------------------------------
# .ci/torch_api_check.py (run under torch 2.11 by .ci/compat-oldest)
# ---------------------------------------------------------------------------
def _api_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("torch_api_check", ROOT / ".ci" / "torch_api_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_torch_api_check_finds_missing_names(tmp_path):
    check = _api_check()
    src = tmp_path / "uses.py"
    src.write_text("import torch\nfrom torch.utils import no_such_module_42\nfrom torch.library import wrap_triton\n"
                   "x = torch.library.no_such_function_42(torch.float32)\ny = torch.cuda.is_available()\n")
    names = check.used_names(src)
    assert set(names) == {"torch.utils.no_such_module_42", "torch.library.wrap_triton",
                          "torch.library.no_such_function_42", "torch.float32", "torch.cuda.is_available"}
    assert names["torch.library.no_such_function_42"] == 4
    assert not check.resolve("torch.utils.no_such_module_42") and not check.resolve("torch.library.no_such_function_42")
    assert check.resolve("torch.library.wrap_triton") and check.resolve("torch.utils.cpp_extension.load")


def test_torch_api_check_passes_with_this_torch():
    proc = subprocess.run([sys.executable, str(ROOT / ".ci" / "torch_api_check.py")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and " 0 missing" in proc.stdout, proc.stdout + proc.stderr
