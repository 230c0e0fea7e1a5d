"""Instruction counts (`fastelbo bench --count`): callgrind's output, the
baseline and A/B comparisons, the exit statuses, and the check of CI: the
tiny cases counted under valgrind against the committed bench/counts.json
(a skip that names the reason where valgrind, its headers or AVX2 are
missing, or where the baseline holds for another compiler/torch/Python)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastelbo import cli
from fastelbo.bench import ab_cli, ab_sides, counts

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "bench" / "counts.json"

DUMP = """# callgrind format
version: 1
creator: callgrind-3.19.0
cmd: python worker.py
part: 3

desc: I1 cache:
desc: Trigger: Client Request: 7#2

positions: line
events: Ir
summary: 160

ob=(1) /usr/lib/x86_64-linux-gnu/libc.so.6
fl=(1) ???
fn=(1) malloc
0 10
cob=(2) /cache/torch-2.13.0+cpu-py311/fastelbo_cpu_0123456789abcdef/fastelbo_cpu_0123456789abcdef.so
cfi=(2) ???
cfn=(2) kernel
calls=1 0
0 100
fn=(3) free
+3 5
ob=(2)
fl=(2)
fn=(2)
0 100
ob=(3) /usr/lib/libpython3.11.so.1.0
fl=(3) ???
fn=(4) _PyEval_EvalFrameDefault
0 45

totals: 160
"""


def test_parse_dump_counts_self_cost_per_object(tmp_path):
    path = tmp_path / "callgrind.out.3"
    path.write_text(DUMP)
    d = counts.parse_dump(path)
    assert d["label"] == "7#2" and d["Ir"] == 160
    by = {Path(k).name: v for k, v in d["by_object"].items()}
    # the call's inclusive 100 is the callee's, not malloc's: libc keeps 10 + 5
    assert by == {"libc.so.6": 15, "fastelbo_cpu_0123456789abcdef.so": 100, "libpython3.11.so.1.0": 45}
    assert sum(d["by_object"].values()) == d["Ir"]
    assert counts.kernel_ir(d["by_object"]) == 100


def test_compare_counts_flags_increases_beyond_tolerance():
    base = {"a": {"Ir": 1000, "kernel_Ir": 100}, "b": {"Ir": 1000, "kernel_Ir": 100}, "c": {"Ir": 5, "kernel_Ir": 1}}
    cur = {"a": {"Ir": 1019, "kernel_Ir": 100}, "b": {"Ir": 1000, "kernel_Ir": 103}, "c": {"error": "boom"}}
    rows = {(r["key"], r["metric"]): r for r in counts.compare_counts(base, cur, 0.02)}
    assert rows[("a", "Ir")]["status"] == "ok" and rows[("a", "Ir")]["change"] == pytest.approx(0.019)
    assert rows[("b", "kernel_Ir")]["status"] == "REGRESSION"
    assert rows[("c", "Ir")]["status"] == "error"
    rows = counts.compare_counts(base, {"a": {"Ir": 900, "kernel_Ir": 100}}, 0.02, keys=["a", "b"])
    assert [r["status"] for r in rows] == ["improved", "ok", "missing", "missing"]
    assert "FAIL" not in counts.format_rows(rows, "t", 0.02)


def test_not_comparable_names_the_differing_build_fields():
    b = {"isa": "AVX2", "compiler": "g++ 12", "torch": "2.13.0+cpu", "python": "3.11.7", "valgrind": "3.19"}
    assert counts.not_comparable(dict(b, valgrind="3.22"), b) == []
    why = counts.not_comparable(dict(b, compiler="g++ 13"), b)
    assert len(why) == 1 and "g++ 13" in why[0]


def test_committed_baseline_says_what_it_holds_for():
    base = json.loads(BASELINE.read_text())
    assert base["schema"] == counts.SCHEMA and base["tolerance"] == 0.02
    assert base["build"]["isa"] == "AVX2" and base["build"]["threads"] == 1
    assert all(base["build"][f] for f in counts.COMPARABLE)
    assert base["counts"] and all(v["Ir"] > v["kernel_Ir"] > 0 for v in base["counts"].values())


def _bench(*args):
    return cli.main(["bench", *args])


def test_count_skips_with_the_reason_where_it_cannot_count(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", {"bench": cli.COMMANDS["bench"]})

    def unavailable():
        raise counts.Unavailable("valgrind is not installed (test)")

    monkeypatch.setattr(counts, "check_available", unavailable)
    assert _bench("--count", "--json", str(tmp_path / "c.json")) == ab_cli.SKIPPED
    assert "SKIPPED: instruction counts unavailable: valgrind is not installed (test)" in capsys.readouterr().out


def test_count_rejects_a_ratio_baseline(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", {"bench": cli.COMMANDS["bench"]})
    monkeypatch.setattr(counts, "check_available", lambda: None)
    assert _bench("--count", "--compare", str(ROOT / "bench" / "baseline.json")) == 2
    assert "not a count baseline" in capsys.readouterr().err


def _fake_result(side, items, extra=0.0):
    build = {"isa": "AVX2", "compiler": "c++ 12", "torch": "t", "python": "p", "valgrind": "v", "threads": 1,
             "half_tables": "off", "kernel_library": "k.so"}
    return {"side": side.info(), "build": build,
            "counts": {it["key"]: {"Ir": int(1000 * (1 + extra)), "kernel_Ir": 100, "halves_Ir": [5000, 5000],
                                   "halves_kernel_Ir": [500, 500], "calls": 10} for it in items}}


def test_count_against_reports_each_side_and_fails_on_an_increase(tmp_path, monkeypatch, capsys):
    """--count --against: the A/B on counts (counting itself faked: this checks the comparison and exit)."""
    monkeypatch.setattr(cli, "COMMANDS", {"bench": cli.COMMANDS["bench"]})
    monkeypatch.setattr(counts, "check_available", lambda: None)
    monkeypatch.setattr(ab_cli, "make_sides", lambda args, repo: (ab_sides.Side("A", "rev", ROOT),
                                                                   ab_sides.Side("B", "tree", ROOT)))
    monkeypatch.setattr(ab_cli, "repo_of", lambda args: ROOT)
    for extra, status in ((0.0, 0), (0.05, 1)):
        monkeypatch.setattr(counts, "count_side",
                            lambda side, items, extra=extra, **kw: _fake_result(side, items, extra if side.label == "B"
                                                                                else 0.0))
        out = tmp_path / f"c{status}.json"
        assert _bench("--count", "--against", "HEAD", "--ops", "kl", "--json", str(out)) == status
        doc = json.loads(out.read_text())
        assert [r["side"]["label"] for r in doc["results"]] == ["A", "B"]
        assert {r["key"] for r in doc["rows"]} == {"kl/fwd/32x64x8/float32/cpu", "kl/fwd+bwd/32x64x8/float32/cpu"}
        text = capsys.readouterr().out
        assert ("FAIL" in text) == bool(status)


def test_count_baseline_of_another_build_is_a_skip(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", {"bench": cli.COMMANDS["bench"]})
    monkeypatch.setattr(counts, "check_available", lambda: None)
    monkeypatch.setattr(counts, "count_side", lambda side, items, **kw: _fake_result(side, items))
    base = json.loads(BASELINE.read_text())
    path = tmp_path / "base.json"
    path.write_text(json.dumps(base))
    assert _bench("--count", "--compare", str(path), "--json", str(tmp_path / "c.json")) == ab_cli.SKIPPED
    assert "holds for another build" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# the check CI runs: real counts under valgrind
# ---------------------------------------------------------------------------
def test_instruction_counts_match_the_committed_baseline(tmp_path, monkeypatch, capsys):
    """Every case of bench/counts.json counted again (AVX2 build, one thread): each Ir and kernel_Ir within
    the baseline's 2%. Skips, with the reason, where counting is impossible or the build differs."""
    monkeypatch.setattr(cli, "COMMANDS", {"bench": cli.COMMANDS["bench"]})
    out = tmp_path / "counts.json"
    rc = _bench("--count", "--compare", str(BASELINE), "--json", str(out))
    text = capsys.readouterr().out
    if rc == ab_cli.SKIPPED:
        pytest.skip(next(line for line in text.splitlines() if "SKIPPED" in line))
    assert rc == 0, text
    doc = json.loads(out.read_text())
    base = json.loads(BASELINE.read_text())
    (result,) = doc["results"]
    assert set(result["counts"]) == set(base["counts"])
    for key, v in result["counts"].items():
        assert "error" not in v, (key, v)
        assert v["Ir"] > v["kernel_Ir"] > 0 and v["calls"] == 2 * counts.COUNT_CALLS
        assert v["halves_kernel_Ir"][0] == v["halves_kernel_Ir"][1], key  # fastelbo's kernels: exact
    assert all(r["status"] in ("ok", "improved") for r in doc["baseline_check"]["rows"])
