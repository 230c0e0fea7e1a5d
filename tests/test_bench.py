"""The benchmark machinery (fastelbo.bench, `fastelbo bench`): bytes models,
case selection, memory probes, table/plot/compare, and one tiny end-to-end
run of the command. No timing assertions: the numbers are the benchmark's
business, these tests only check the instruments."""

from __future__ import annotations

import copy
import json
import os
import platform
import struct
import zlib

import pytest
import torch

from fastelbo import cli
from fastelbo._backend import available
from fastelbo.bench import cases as C
from fastelbo.bench import measure as M
from fastelbo.bench import plot, report, sweep

needs_cpu_backend = pytest.mark.skipif(not available("cpu", "cpu")[0], reason="fastelbo's C++ CPU kernels unavailable")


# ---------------------------------------------------------------------------
# bytes model
# ---------------------------------------------------------------------------
def test_bytes_model_bernoulli():
    s = C.Shape("t", 4, 10, 3)
    fwd = C.bytes_model("bernoulli", s, "fwd", 4)
    assert fwd["bytes"] == (2 * 40 + 4) * 4          # read logits, x; write one value per row
    both = C.bytes_model("bernoulli", s, "fwd+bwd", 4)
    assert both["bytes"] == (3 * 40 + 2 * 4) * 4     # + read grad [B], write dlogits
    assert C.bytes_model("bernoulli", s, "fwd+bwd", 2)["bytes"] == both["bytes"] // 2


def test_bytes_model_step_at_the_target_shape():
    s = C.TARGET
    B, Dx, Dz = s.B, s.Dx, s.Dz
    m = C.bytes_model("step", s, "fwd+bwd", 4)
    # reads recon, x, mu, logvar, grad_z; writes z, loss, drecon, dmu, dlogvar
    assert m["elements"] == 3 * B * Dx + 6 * B * Dz + 1
    assert m["bytes"] == 4 * m["elements"]
    assert C.Case("step", "fwd+bwd", s, "bfloat16").min_bytes() == 2 * m["elements"]


@pytest.mark.parametrize("op", list(C.OPS))
def test_every_input_is_read_once_in_the_model(op):
    s = C.Shape("t", 5, 7, 3)
    names = set(C.OPS[op].tensor_specs(s))
    for p in C.OPS[op].passes:
        m = C.bytes_model(op, s, p, 4)
        assert names <= set(m["reads"]), (op, p)
        assert m["bytes"] == 4 * (sum(m["reads"].values()) + sum(m["writes"].values()))
        if p == "fwd+bwd" and "fwd" in C.OPS[op].passes:
            assert m["bytes"] > C.bytes_model(op, s, "fwd", 4)["bytes"]


def test_rsample_model_counts_no_eps():
    s = C.Shape("t", 8, 16, 4)
    assert C.bytes_model("rsample", s, "fwd", 4)["bytes"] == 3 * 8 * 4 * 4
    assert C.bytes_model("rsample", s, "fwd+bwd", 4)["bytes"] == 5 * 8 * 4 * 4


# ---------------------------------------------------------------------------
# case selection
# ---------------------------------------------------------------------------
def test_quick_and_full_selections():
    quick = C.sweep_cases(full=False)
    assert {c.dtype for c in quick} == {"float32"}
    assert {c.shape for c in quick} == set(C.QUICK_SHAPES)
    assert C.TARGET in C.QUICK_SHAPES and C.TINY in C.QUICK_SHAPES
    full = C.sweep_cases(full=True)
    assert {c.dtype for c in full} == {"float32", "bfloat16"}
    assert {c.shape for c in full} == set(C.FULL_SHAPES)
    assert {(s.B, s.Dx, s.Dz) for s in C.FULL_SHAPES} >= {(256, 784, 32), (4096, 784, 64), (128, 3072, 128),
                                                         (128, 12288, 256), (64, 196608, 512), (32, 64, 8)}
    assert {c.op for c in full} == set(C.OPS)
    assert [c.pass_ for c in full if c.op == "step"] == ["fwd+bwd"] * len(C.FULL_SHAPES) * 2
    assert len({c.key for c in full}) == len(full)


def test_parse_shape():
    assert C.parse_shape("4096x784x64") == C.TARGET
    assert C.parse_shape("3x5x2") == C.Shape("custom", 3, 5, 2)
    with pytest.raises(ValueError):
        C.parse_shape("3x5")


def test_inputs_follow_the_pass():
    fwd = C.make_inputs(C.Case("elbo", "fwd", C.TINY, "bfloat16"))
    assert all(not t.requires_grad for t in fwd.values())
    assert fwd["recon"].dtype == torch.bfloat16 and fwd["recon"].shape == (32, 64)
    assert 0 <= float(fwd["x"].min()) and float(fwd["x"].max()) <= 1
    both = C.make_inputs(C.Case("step", "fwd+bwd", C.TINY, "float32"))
    assert [n for n, t in both.items() if t.requires_grad] == ["recon", "mu", "logvar"]
    assert both["grad:1"].shape == (32, 8) and "grad:0" not in both  # the loss is a scalar: gradient 1


@needs_cpu_backend
@pytest.mark.parametrize("op", ["kl", "kl-learned", "bernoulli", "gaussian", "elbo"])
def test_fastelbo_and_eager_compute_the_same_thing(op):
    """The benchmark compares like with like (ops without noise: equal outputs and gradients)."""
    for p in C.OPS[op].passes:
        case = C.Case(op, p, C.TINY, "float32")
        t = C.make_inputs(case)
        ref = C.build(case, "eager", t)[1]()
        got = C.build(case, "fastelbo-cpu", t)[1]()
        for a, b in zip(ref, got):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@needs_cpu_backend
def test_step_nd_is_step_on_image_shaped_tensors():
    """step-nd times the same work as step: its inputs are step's values as [B, 1, h, w] (same element
    counts), and from one seed the loss and every gradient are step's, reshaped."""
    flat, nd = C.Case("step", "fwd+bwd", C.TINY, "float32"), C.Case("step-nd", "fwd+bwd", C.TINY, "float32")
    t_flat, t_nd = C.make_inputs(flat), C.make_inputs(nd)
    assert t_nd["recon"].shape == (32, 1, 8, 8) and t_nd["mu"].shape == (32, 1, 2, 4)
    for name, v in t_flat.items():
        assert torch.equal(t_nd[name].reshape(v.shape), v), name
    outs = []
    for case, t in ((flat, t_flat), (nd, t_nd)):
        torch.manual_seed(3)
        outs.append(C.build(case, "fastelbo-cpu", t)[1]())
    for a, b in zip(*outs):
        assert torch.equal(b.reshape(a.shape), a)
    assert C.Case("step-nd", "fwd+bwd", C.TARGET, "float32").min_bytes() == C.Case(
        "step", "fwd+bwd", C.TARGET, "float32").min_bytes()


# ---------------------------------------------------------------------------
# memory probes
# ---------------------------------------------------------------------------
@needs_cpu_backend
def test_saved_for_backward_counts_only_what_is_not_an_input():
    case = C.Case("elbo", "fwd+bwd", C.TINY, "float32")
    t = C.make_inputs(case)
    inputs = [v for k, v in t.items() if not k.startswith("grad:")]
    fwd_fastelbo, _ = C.build(case, "fastelbo-cpu", t)
    fwd_eager, _ = C.build(case, "eager", t)
    assert M.saved_for_backward(fwd_fastelbo, inputs) == 0  # keeps the inputs only
    assert M.saved_for_backward(fwd_eager, inputs) > 0      # torch.distributions keeps intermediates
    x = torch.randn(100, requires_grad=True)
    assert M.saved_for_backward(lambda: (x * 2).exp(), [x]) == 400  # exp saves its result, mul-by-constant nothing


def test_peak_bytes_sees_temporaries():
    def fn():
        tmp = torch.ones(1 << 18)             # 1 MiB temporary, freed before the return
        return (tmp * 2).sum()
    peak = M.peak_bytes(fn)
    assert peak is not None and peak >= 2 * (1 << 20)   # tmp and tmp * 2 live together
    assert peak < 8 * (1 << 20)


def test_copy_ref_picks_the_nearest_size():
    curve = [{"bytes_per_tensor": s, "traffic_bytes": 2 * s, "GBps": g} for s, g in ((1 << 20, 50.0), (1 << 28, 20.0))]
    assert M.copy_ref(curve, 3 << 20)["GBps"] == 50.0
    assert M.copy_ref(curve, 300 << 20)["GBps"] == 20.0


def test_paired_speedup_is_the_median_of_round_ratios():
    assert M.paired_speedup([2.0, 4.0, 100.0], [1.0, 1.0, 1.0]) == 4.0
    assert M.paired_speedup([1.0, 1.0, 1.0], [2.0, 2.0, 2.0]) == 0.5


# ---------------------------------------------------------------------------
# compare / baseline
# ---------------------------------------------------------------------------
def _doc(ratios: dict, threads=2, cpu_id="GenuineIntel family 6 model 207 stepping 2") -> dict:
    machine = {"device": "cpu", "device_name": "cpu-x", "cpu_model": "cpu-x", "cpu_count": 2, "torch_threads": threads,
               "cpu_capability": "AVX512", "torch": torch.__version__, "python": "3", "platform": "linux",
               "fastelbo": "0", "triton": None, "cpu_id": cpu_id}
    results = []
    for key, r in ratios.items():
        op, pass_, shape, dtype, backend = key.split("/")
        B, Dx, Dz = (int(v) for v in shape.split("x"))
        base = {"key": "/".join(key.split("/")[:4]), "op": op, "pass": pass_, "shape": shape, "shape_family": "t",
                "B": B, "Dx": Dx, "Dz": Dz, "dtype": dtype, "min_bytes": 1000}
        eager = {**base, "impl": "eager", "median_s": 1e-3, "speedup_vs_eager": 1.0}
        if "vs_compile" in r:
            eager["speedup_vs_compile"] = r["vs_eager"] / r["vs_compile"]
        results.append(eager)
        results.append({**base, "impl": f"fastelbo-{backend}", "median_s": 1e-3 / r["vs_eager"], "GBps": 1.0,
                        "pct_copy": 5.0, "saved_bytes": 0, "peak_bytes": 10,
                        **{f"speedup_{k}": v for k, v in r.items()}})
    return {"schema": sweep.SCHEMA, "mode": "quick", "created": "now", "machine": machine, "results": results,
            "ratios": ratios, "timing": {"rounds": 3, "min_round_s": 0.001},
            "copy_bandwidth": {"GBps": 30.0, "bytes_per_tensor": 1 << 28,
                               "curve": [{"bytes_per_tensor": 1 << 28, "traffic_bytes": 1 << 29, "GBps": 30.0}]}}


BASE = {"step/fwd+bwd/4096x784x64/float32/cpu": {"vs_eager": 5.0, "vs_compile": 2.0},
        "kl/fwd/32x64x8/float32/cpu": {"vs_eager": 3.0, "vs_compile": 1.5}}


def test_compare_passes_within_tolerance_and_on_improvement():
    cur = copy.deepcopy(BASE)
    cur["step/fwd+bwd/4096x784x64/float32/cpu"] = {"vs_eager": 4.3, "vs_compile": 2.6}  # -14%, +30%
    res = report.compare(_doc(cur), report.baseline_doc(_doc(BASE)), 0.15)
    assert res["ok"] and res["regressions"] == 0 and res["compared"] == 4
    assert {r["status"] for r in res["rows"]} == {"ok", "improved"}
    assert "PASS" in report.format_compare(res)


def test_compare_fails_when_a_ratio_drops_more_than_tolerance():
    cur = copy.deepcopy(BASE)
    cur["kl/fwd/32x64x8/float32/cpu"]["vs_compile"] = 1.2  # -20%
    res = report.compare(_doc(cur), _doc(BASE), 0.15)
    assert not res["ok"] and res["regressions"] == 1
    bad = [r for r in res["rows"] if r["status"] == "REGRESSION"]
    assert bad[0]["key"] == "kl/fwd/32x64x8/float32/cpu" and bad[0]["metric"] == "vs_compile"
    assert "FAIL" in report.format_compare(res)


def test_compare_boundary_and_missing_cases():
    cur = {"step/fwd+bwd/4096x784x64/float32/cpu": {"vs_eager": 4.25, "vs_compile": 1.7}}  # exactly -15%: allowed
    res = report.compare(_doc(cur, threads=4), _doc(BASE), 0.15)
    assert res["ok"]
    assert sum(r["status"] == "missing" for r in res["rows"]) == 2  # kl not measured: listed, not failed
    assert any("torch_threads" in n for n in res["notes"])
    assert not report.compare(_doc({}), _doc(BASE))["compared"]


def test_compare_says_when_the_cpu_model_is_not_the_baselines():
    same = report.compare(_doc(BASE), report.baseline_doc(_doc(BASE)))
    assert not [n for n in same["notes"] if "CPU model" in n]
    other = report.compare(_doc(BASE, cpu_id="GenuineIntel family 6 model 106 stepping 6"),
                           report.baseline_doc(_doc(BASE)))
    assert [n for n in other["notes"] if "CPU model differs" in n and "model 106" in n and "model 207" in n]
    assert other["ok"]  # a note, not a verdict: the ratios are still compared
    unnamed = report.compare(_doc(BASE), report.baseline_doc(_doc(BASE, cpu_id=None)))
    assert [n for n in unnamed["notes"] if "does not record its CPU model" in n]


def test_machine_info_names_the_cpu_model():
    info = M.machine_info("cpu")
    assert info["cpu_id"] and isinstance(info["cpu_caches"], dict)
    if os.path.exists("/proc/cpuinfo") and platform.machine() in ("x86_64", "AMD64"):
        assert " family " in info["cpu_id"] and " model " in info["cpu_id"], info["cpu_id"]
    assert info["cpu_id"] in "\n".join(report.header({"machine": info}))


def test_merge_runs_takes_the_median_ratio_or_for_a_baseline_the_lowest():
    runs = [_doc({"kl/fwd/32x64x8/float32/cpu": {"vs_eager": v, "vs_compile": 1.0}}) for v in (3.0, 9.0, 4.0)]
    merged = report.merge_runs(runs)
    assert merged["ratios"]["kl/fwd/32x64x8/float32/cpu"] == {"vs_eager": 4.0, "vs_compile": 1.0}
    assert report.baseline_doc(merged)["merged_from"] == ["now"] * 3
    assert report.merge_runs(runs, "min")["ratios"]["kl/fwd/32x64x8/float32/cpu"] == {"vs_eager": 3.0,
                                                                                     "vs_compile": 1.0}
    with pytest.raises(ValueError, match="how"):
        report.merge_runs(runs, "mean")


def test_cli_compare_from_json(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"bench": cli.COMMANDS["bench"]})
    base = report.write_json(report.baseline_doc(_doc(BASE)), tmp_path / "baseline.json")
    good = report.write_json(_doc(BASE), tmp_path / "good.json")
    worse = copy.deepcopy(BASE)
    worse["step/fwd+bwd/4096x784x64/float32/cpu"]["vs_eager"] = 2.0
    bad = report.write_json(_doc(worse), tmp_path / "bad.json")
    args = ["bench", "--no-plot", "--compare", str(base), "--from-json"]
    assert cli.main(args + [str(good)]) == 0
    assert cli.main(args + [str(bad)]) == 1
    assert cli.main(args + [str(bad), "--tolerance", "0.7"]) == 0


# ---------------------------------------------------------------------------
# table, plot, progress
# ---------------------------------------------------------------------------
def _png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, idat = 8, [], b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks.append(kind)
        if kind == b"IDAT":
            idat += body
        pos += 12 + n
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND"
    w, h = struct.unpack(">II", data[16:24])
    assert len(zlib.decompress(idat)) == h * (1 + 3 * w)
    return w, h


def test_plot_is_a_valid_png():
    w, h = _png_size(plot.render(_doc(BASE)))
    assert w >= 200 and h >= 200
    _png_size(plot.render(_doc({})))  # nothing to plot still gives a picture saying so


def test_table_has_the_columns_and_the_machine():
    text = report.format_table(_doc(BASE))
    for col in ("median", "vs eager", "vs compile", "GB/s", "%copy", "saved", "peak", "cpu-x", "copy bandwidth"):
        assert col in text
    assert "fastelbo-cpu" in text


def test_formatters():
    assert report.fmt_time(12.34e-6) == "12.3 us"
    assert report.fmt_time(0.0042) == "4.20 ms"
    assert report.fmt_bytes(8) == "8 B" and report.fmt_bytes(3 << 20) == "3.0 MiB" and report.fmt_bytes(None) == "-"


def test_progress_writes_plain_lines(tmp_path):
    with open(tmp_path / "log", "w") as f:
        bar = sweep.Progress(2, f)
        bar.step("one")
        bar.step("two")
        bar.close()
    lines = (tmp_path / "log").read_text().splitlines()
    assert len(lines) == 3 and "0/2" in lines[0] and "two" in lines[1] and lines[2].startswith("done")


# ---------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------
@needs_cpu_backend
def test_cli_tiny_sweep_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", {"bench": cli.COMMANDS["bench"]})
    out = tmp_path / "res.json"
    rc = cli.main(["bench", "--device", "cpu", "--shapes", "32x64x8", "--ops", "kl", "--rounds", "3",
                   "--min-round-ms", "0.5", "--budget-s", "0.5", "--no-overhead", "--json", str(out),
                   "--save-baseline", str(tmp_path / "base.json")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "kl" in text and "fastelbo-cpu" in text and "copy bandwidth" in text
    doc = json.loads(out.read_text())
    assert doc["schema"] == sweep.SCHEMA and doc["mode"] == "custom"
    assert {r["impl"] for r in doc["results"]} == {"eager", "compile", "fastelbo-cpu"}
    assert {r["pass"] for r in doc["results"]} == {"fwd", "fwd+bwd"}
    for r in doc["results"]:
        assert "error" not in r, r
        assert r["median_s"] > 0 and r["min_bytes"] == C.Case("kl", r["pass"], C.TINY, "float32").min_bytes()
        assert r["peak_bytes"] is not None
    assert set(doc["ratios"]) == {"kl/fwd/32x64x8/float32/cpu", "kl/fwd+bwd/32x64x8/float32/cpu"}
    assert all({"vs_eager", "vs_compile"} <= set(v) for v in doc["ratios"].values())
    _png_size(out.with_suffix(".png").read_bytes())
    # its own baseline: compares clean up to noise; a huge tolerance makes it deterministic
    assert cli.main(["bench", "--from-json", str(out), "--no-plot", "--compare", str(tmp_path / "base.json"),
                     "--tolerance", "0.99"]) == 0


@needs_cpu_backend
def test_overhead_layers_rows():
    rows = M.overhead_layers(C.TINY, "float32", "cpu", "cpu", rounds=2, min_round_s=0.0005)
    assert [r["op"] for r in rows] == list(M.OVERHEAD_OPS)
    for r in rows:
        assert r["api_s"] > 0 and r["op_s"] > 0 and r["raw_s"] > 0
        assert r["python_layer_s"] == pytest.approx(r["api_s"] - r["op_s"])
    assert "api" in report.format_overhead(rows)


@needs_cpu_backend
def test_cli_compare_remeasures_regressions_then_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"bench": cli.COMMANDS["bench"]})
    impossible = {"kl/fwd/32x64x8/float32/cpu": {"vs_eager": 1000.0}}
    base = report.write_json(report.baseline_doc(_doc(impossible)), tmp_path / "base.json")
    out = tmp_path / "res.json"
    rc = cli.main(["bench", "--device", "cpu", "--shapes", "32x64x8", "--ops", "kl", "--passes", "fwd",
                   "--impls", "eager,fastelbo-cpu", "--rounds", "3", "--min-round-ms", "0.5", "--no-overhead",
                   "--no-memory", "--no-plot", "--json", str(out), "--compare", str(base), "--retries", "1"])
    assert rc == 1
    doc = json.loads(out.read_text())
    assert [r["attempt"] for r in doc["retries"]] == [1]
    assert doc["retries"][0]["key"] == "kl/fwd/32x64x8/float32/cpu"


def test_profile_step_script_runs_and_accounts_for_the_step(capsys):
    """bench/profile_step.py (the README's breakdown of the step) still runs and prints each part."""
    import importlib.util
    from pathlib import Path

    ok, why = available("cpu", "cpu")
    if not ok:
        pytest.skip(f"the C++ CPU backend is not available: {why}")
    path = Path(__file__).resolve().parents[1] / "bench" / "profile_step.py"
    spec = importlib.util.spec_from_file_location("profile_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--shape", "32x64x8", "--rounds", "3"])
    out = capsys.readouterr().out
    for part in ("rsample", "elbo_backward", "kernels in step order", "glue", "read recon, x + write"):
        assert part in out, out
    assert "float32 step" not in out  # float32 has nothing to compare with
    module.main(["--shape", "32x64x8", "--rounds", "3", "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert "bfloat16 32x64x8" in out or "32x64x8 bfloat16" in out, out
    assert "float32 step, same rounds" in out and "bfloat16 / float32 = " in out, out
