"""The A/B mode (`fastelbo bench --against`): its statistics, the sides (git
export, import shim, worker processes) and one tiny end-to-end run. No timing
assertions: on identical sides the verdicts are whatever the machine gives;
only the fields and the exit statuses that do not depend on speed are checked."""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from fastelbo import cli
from fastelbo._backend import available
from fastelbo.bench import ab, ab_cli, ab_sides
from fastelbo.bench import ab_stats as S
from fastelbo.bench import cases as C

ROOT = Path(__file__).resolve().parents[1]
needs_cpu_backend = pytest.mark.skipif(not available("cpu", "cpu")[0], reason="fastelbo's C++ CPU kernels unavailable")
needs_git_checkout = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                                        reason="needs git and a git checkout of fastelbo")


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_signed_rank_null_distribution_is_exact(n):
    """Against brute force: every sign pattern of ranks 1..n equally likely."""
    sums = [sum(r for r, s in zip(range(1, n + 1), signs) if s) for signs in itertools.product((0, 1), repeat=n)]
    cdf = S.signed_rank_cdf(n)
    for w in range(n * (n + 1) // 2 + 1):
        assert cdf[w] == pytest.approx(sum(s <= w for s in sums) / 2 ** n)


def test_p_value_and_interval_of_a_clear_shift():
    d = [0.1 + 0.01 * i for i in range(10)]  # all positive
    assert S.signed_rank_p(d) == pytest.approx(2 / 2 ** 10)
    est, lo, hi = S.hodges_lehmann_ci(d, 0.05)
    assert lo > 0 and lo <= est <= hi
    assert est == pytest.approx(0.145)


def test_interval_is_infinite_below_the_minimum_pairs():
    n = S.min_pairs(0.05)
    assert n == 6  # 2 * 2**-6 <= 0.05 < 2 * 2**-5
    assert S.hodges_lehmann_ci([1.0] * (n - 1), 0.05)[1] == -math.inf
    assert S.hodges_lehmann_ci([1.0] * n, 0.05)[1] == 1.0


def test_interval_covers_the_shift_at_its_level():
    """Coverage of the Hodges-Lehmann interval on heavy-tailed noise (Cauchy-like bursts)."""
    rng = random.Random(7)
    misses, trials = 0, 400
    for _ in range(trials):
        d = [0.05 + rng.gauss(0, 0.02) * (10 if rng.random() < 0.1 else 1) for _ in range(20)]
        _, lo, hi = S.hodges_lehmann_ci(d, 0.10)
        misses += not (lo <= 0.05 <= hi)
    assert misses / trials < 0.10 + 0.04  # nominal 10%, plus sampling slack


def _rounds(ratio, n=30, noise=0.03, seed=0):
    rng = random.Random(seed)
    a = [1e-3 * (1 + rng.random()) for _ in range(n)]  # drifting machine speed, shared by the pair
    b = [x * ratio * math.exp(rng.gauss(0, noise)) for x in a]
    return a, b


def test_verdicts():
    same = S.compare_pairs(*_rounds(1.0), alpha_case=0.05 / 45, threshold=0.10)
    assert same["verdict"] == "no difference" and not same["fail"]
    slow = S.compare_pairs(*_rounds(1.3), alpha_case=0.05 / 45, threshold=0.10)
    assert slow["verdict"] == "slower" and slow["fail"] and slow["ci"][0] > 1
    fast = S.compare_pairs(*_rounds(0.7), alpha_case=0.05 / 45, threshold=0.10)
    assert fast["verdict"] == "faster" and not fast["fail"]
    # significant but under the resolution: no difference; significant, above resolution, under threshold: no failure
    small = S.compare_pairs(*_rounds(1.07, noise=0.002), alpha_case=0.05 / 45, threshold=0.10)
    assert small["significant"] and small["verdict"] == "no difference"  # default resolution: the threshold
    mid = S.compare_pairs(*_rounds(1.07, noise=0.002), alpha_case=0.05 / 45, threshold=0.10, resolution=0.05)
    assert mid["verdict"] == "slower" and not mid["fail"]


# ---------------------------------------------------------------------------
# sides
# ---------------------------------------------------------------------------
def test_package_layout_of_this_checkout_maps_kernels_and_csrc():
    mapping, paths = ab_sides.package_layout(ROOT)
    assert mapping["fastelbo.kernels"] == str(ROOT / "kernels")
    assert mapping["fastelbo.csrc"] == str(ROOT / "csrc")
    assert mapping["fastelbo"] == str(ROOT / "fastelbo")
    assert paths == [str(ROOT)]


def test_package_layout_of_a_src_layout_project(tmp_path):
    (tmp_path / "src" / "myvae").mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "myvae"\n')
    assert ab_sides.package_layout(tmp_path) == ({}, [str(tmp_path / "src"), str(tmp_path)])


@needs_git_checkout
def test_exported_revision_imports_its_own_fastelbo(tmp_path, monkeypatch):
    """git archive of HEAD into the cache, then a worker that imports fastelbo and fastelbo.kernels
    from the export, not from this checkout or an installed copy (no kernel build: hello only)."""
    monkeypatch.setenv("FASTELBO_CACHE_DIR", str(tmp_path / "cache"))
    side = ab_sides.side_from_revision("A", ROOT, "HEAD")
    assert side.root == tmp_path / "cache" / "ab" / side.commit / "tree"
    assert side.cache_dir == tmp_path / "cache" / "ab" / side.commit / "cache"
    assert ab_sides.export_revision(ROOT, side.commit) == side.root  # cached: a repeat does not export again
    w = ab_sides.WorkerProcess(side, log_dir=tmp_path / "logs")
    try:
        hello = w.call({"cmd": "hello"})
    finally:
        assert w.close() == 0
    assert hello["ok"], hello
    assert Path(hello["fastelbo_file"]) == side.root / "fastelbo" / "__init__.py"
    assert Path(hello["kernels_file"]) == side.root / "kernels" / "__init__.py"


@needs_git_checkout
def test_bad_revision_is_a_clear_error():
    with pytest.raises(ab_sides.SideError, match="rev-parse"):
        ab_sides.side_from_revision("A", ROOT, "no-such-revision-xyz")


def test_worker_reports_errors_without_dying(tmp_path):
    side = ab_sides.Side("B", "this checkout", ROOT)
    w = ab_sides.WorkerProcess(side, log_dir=tmp_path)
    try:
        r = w.call({"cmd": "prepare", "id": 0, "case": "kl/fwd/32x64x8/float32", "backend": "no-such-backend"})
        assert not r["ok"] and "no-such-backend" in r["error"]
        r = w.call({"cmd": "time", "id": 99, "iters": 1})
        assert not r["ok"] and "KeyError" in r["error"]
    finally:
        assert w.close() == 0


def test_slowed_tree_edit_still_applies_to_the_kernel():
    """bench/slowed_tree.py (the README's slowed-build demonstration) edits csrc/cpu/loglik.cpp verbatim."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("slowed_tree", ROOT / "bench" / "slowed_tree.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    slowed = module.slow_down((ROOT / module.KERNEL).read_text())
    assert "SLOWED ON PURPOSE" in slowed and slowed.count("term.forward(i, validate_x, bad)") == 2
    with pytest.raises(ValueError, match="not found verbatim"):
        module.slow_down("int main() {}")


# ---------------------------------------------------------------------------
# end to end (tiny)
# ---------------------------------------------------------------------------
def _same_tree_sides(args, repo):
    return (ab_sides.side_from_path("A", ROOT, own_cache=False), ab_sides.side_from_path("B", ROOT, own_cache=False))


@needs_cpu_backend
def test_cli_against_tiny_end_to_end(tmp_path, monkeypatch, capsys):
    """The working tree against itself (no export, no build): both sides run, every field is there.
    Five pairs are below the minimum for a finite interval, so the verdict cannot depend on noise."""
    monkeypatch.setattr(cli, "COMMANDS", {"bench": cli.COMMANDS["bench"]})
    monkeypatch.setattr(ab_cli, "make_sides", _same_tree_sides)
    out = tmp_path / "ab.json"
    rc = cli.main(["bench", "--against", "--ops", "kl,step", "--shapes", "32x64x8", "--pairs", "4",
                   "--min-round-ms", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "Wilcoxon" in text and "PASS" in text
    doc = json.loads(out.read_text())
    assert doc["schema"] == ab.SCHEMA
    assert [r["key"] for r in doc["rows"]] == [f"{c.key}/cpu" for c in C.cases(ops=["kl", "step"], shapes=[C.TINY])]
    for r in doc["rows"]:
        assert "error" not in r, r
        assert r["pairs"] == 4 and len(r["a_rounds_s"]) == len(r["b_rounds_s"]) == 4
        assert r["verdict"] == "no difference" and r["ci"] == [0.0, math.inf]
        assert r["a_median_s"] > 0 and r["b_median_s"] > 0 and r["ratio"] > 0
    assert [s["label"] for s in doc["sides"]] == ["A", "B"]
    assert all(Path(s["fastelbo_file"]).parent == ROOT / "fastelbo" for s in doc["sides"])
    assert doc["method"]["threshold"] == 0.10 and doc["method"]["alpha"] == 0.05
    assert doc["machine"]["cpu_id"] and doc["machine"]["load_avg_before"]


@needs_cpu_backend
def test_run_ab_reports_a_case_that_fails_on_one_side(tmp_path):
    side = ab_sides.side_from_path("A", ROOT, own_cache=False)
    items = [{"key": "broken", "prepare": {"case": "kl/fwd/32x64x8/float32", "backend": "nope"}}]
    doc = ab.run_ab(side, side, items, pairs=2, min_round_s=0.001, progress=False, log_dir=tmp_path)
    assert doc["errors"] == 1 and "nope" in doc["rows"][0]["error"]
    assert ab.exit_status(doc) == 2 and "ERROR" in ab.format_ab(doc)


def test_workload_file_runs_in_the_worker(tmp_path):
    """--workload FILE:FUNCTION (a downstream project's step): names, prepare, time."""
    wl = tmp_path / "perf_workload.py"
    wl.write_text("import torch\n\ndef workloads():\n    x = torch.ones(8)\n"
                  "    return {'neg': lambda: torch.neg(x), 'add': lambda: x + x}\n")
    side = ab_sides.Side("B", "tmp", tmp_path)
    assert ab_cli.workload_names(side, f"{wl}:workloads") == ["neg", "add"]
    doc = ab.run_ab(side, side, ab.workload_items(["neg"]), pairs=2, min_round_s=0.001, progress=False,
                    workload=f"{wl}:workloads", log_dir=tmp_path)
    assert doc["rows"][0]["key"] == "neg" and doc["rows"][0]["a_median_s"] > 0


# ---------------------------------------------------------------------------
# for projects that use fastelbo
# ---------------------------------------------------------------------------
from fastelbo.bench.pytest_plugin import time_step  # noqa: E402,F401  (the fixture under test)


def test_time_step_fixture_times_a_step_and_records_the_machine(time_step, benchmark):
    import torch

    x = torch.ones(64, requires_grad=True)

    def step():
        (x * x).sum().backward()

    median = time_step(step, rounds=2, min_round_s=0.001, name="toy step")
    assert median > 0 and benchmark.name == "toy step"
    info = benchmark.extra_info
    assert info["calls_per_round"] >= 1 and info["cpu_id"] and info["fastelbo"] and info["torch"]


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t", *args],
                   check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_downstream_project_ab_with_its_own_workload(tmp_path, monkeypatch, capsys):
    """A project that uses fastelbo: --repo (its checkout, a src layout), --workload (its step),
    --against HEAD. Side A imports the project's package from the export of HEAD, side B from
    the working tree; fastelbo itself is the installed one on both sides (no build)."""
    repo = tmp_path / "myproject"
    (repo / "src" / "myvae").mkdir(parents=True)
    (repo / "pyproject.toml").write_text('[project]\nname = "myvae"\nversion = "0"\n\n'
                                         '[tool.setuptools.package-dir]\n"" = "src"\n')
    (repo / "src" / "myvae" / "__init__.py").write_text("WHERE = __file__\n")
    (repo / "perf_workloads.py").write_text(
        "import torch\nimport myvae\n\n"
        "def workloads():\n"
        "    x = torch.ones(16)\n"
        "    assert 'ab' in myvae.WHERE or 'myproject' in myvae.WHERE\n"
        "    return {'step': lambda: torch.nn.functional.softplus(x).sum()}\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "one")
    monkeypatch.setattr(cli, "COMMANDS", {"bench": cli.COMMANDS["bench"]})
    monkeypatch.setenv("FASTELBO_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "ab.json"
    rc = cli.main(["bench", "--repo", str(repo), "--workload", f"{repo / 'perf_workloads.py'}:workloads",
                   "--against", "HEAD", "--pairs", "2", "--min-round-ms", "1", "--json", str(out)])
    assert rc == 0, capsys.readouterr()
    doc = json.loads(out.read_text())
    assert [r["key"] for r in doc["rows"]] == ["step"] and "error" not in doc["rows"][0]
    a, b = doc["sides"]
    assert a["root"].startswith(str(tmp_path / "cache" / "ab")) and a["cache_dir"] is None
    assert b["root"] == str(repo)


class _FakeWorker:
    """Replies like ab_worker: `time` gives per-call seconds from a list of factors, one per measurement."""

    def __init__(self, factors):
        self.factors, self.rounds, self.pending = list(factors), 0, None

    def send(self, msg):
        self.pending = msg

    def receive(self):
        msg, self.pending = self.pending, None
        return self.call(msg)

    def call(self, msg):
        if msg["cmd"] == "calibrate":
            return {"ok": True, "iters": 3}
        if msg["cmd"] != "time":
            return {"ok": True}
        factor = self.factors[min(self.rounds // 30, len(self.factors) - 1)]  # 30 rounds per measurement
        self.rounds += 1
        t = 1e-3 * factor * (1 + 0.001 * (self.rounds % 7))
        return {"ok": True, "min_s": t, "mean_s": t}


@pytest.mark.parametrize("b_factors, verdict, fail, replicated", [
    ((1.5, 1.5), "slower", True, True),          # a slower build stays slower
    ((1.5, 1.0), "no difference", False, False),  # a stall of one measurement does not replicate
    ((0.5, 0.5), "faster", False, True),
    ((1.0,), "no difference", False, None),      # nothing to replicate
])
def test_a_verdict_stands_only_when_its_replicate_agrees(b_factors, verdict, fail, replicated):
    import random as _random

    workers = [_FakeWorker([1.0]), _FakeWorker(b_factors)]
    row = ab._run_item(workers, 0, {"key": "k", "prepare": {}}, 30, 0.01, 0.05 / 45, 0.10, 0.10, "min",
                       _random.Random(0))
    assert row["verdict"] == verdict and row["fail"] == fail
    if replicated is None:
        assert "replicate" not in row
    else:
        assert row.get("not_replicated", False) == (not replicated) and "ratio" in row["replicate"]
