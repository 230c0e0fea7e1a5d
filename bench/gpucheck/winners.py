"""Which fastelbo backend is faster on CUDA tensors, per op family and shape class.

`backend="auto"` on CUDA tensors tries triton, then cuda (fastelbo._backend),
an order set before either ran on a GPU. This turns a GPU benchmark into the
measurement that decides it:

  * per case, the paired ratio of the two backends' times: the median over
    the interleaved rounds of t_triton[r] / t_cuda[r] (> 1: cuda is faster),
    a tie within TIE (5%);
  * the shape class of a case, from its minimum bytes (bytes model) against
    the GPU's L2 cache: "launch-bound" (under 4 MiB), "L2-resident" (at most
    L2), "L2-edge", "DRAM" (at least twice L2);
  * per op family, the rule: the backend that wins every fwd+bwd case of the
    training shapes (DRAM and L2-resident classes), ties aside; if those are
    all ties or absent, the launch-bound class decides; if they disagree,
    "mixed" (the cases say where each wins).

Standard library only: the report reads it without importing torch.
"""

from __future__ import annotations

import statistics

TIE = 0.05
SMALL_BYTES = 4 << 20
PAIR = ("triton", "cuda")
TRAINING_CLASSES = ("DRAM", "L2-resident")


def shape_class(min_bytes: float, l2_bytes: float | None) -> str:
    if min_bytes < SMALL_BYTES:
        return "launch-bound"
    if not l2_bytes:
        return "unknown L2"
    if min_bytes <= l2_bytes:
        return "L2-resident"
    if min_bytes >= 2 * l2_bytes:
        return "DRAM"
    return "L2-edge"


def paired_ratio(a_rounds, b_rounds) -> float | None:
    """Median over rounds of a[r] / b[r]."""
    pairs = [a / b for a, b in zip(a_rounds or (), b_rounds or ()) if a and b]
    return float(statistics.median(pairs)) if pairs else None


def verdict(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    if ratio > 1 + TIE:
        return "cuda"
    if ratio < 1 / (1 + TIE):
        return "triton"
    return "tie"


def case_winners(doc: dict) -> list[dict]:
    """One row per case that ran both fastelbo backends."""
    l2 = (doc.get("machine") or {}).get("l2_bytes")
    by_case: dict[str, dict] = {}
    for row in doc.get("results", []):
        by_case.setdefault(row["key"], {})[row["impl"]] = row
    out = []
    for key, impls in by_case.items():
        a, b = impls.get("fastelbo-" + PAIR[0]), impls.get("fastelbo-" + PAIR[1])
        if not a or not b or "rounds_s" not in a or "rounds_s" not in b:
            continue
        ratio = paired_ratio(a["rounds_s"], b["rounds_s"])
        out.append({"key": key, "op": a["op"], "pass": a["pass"], "shape": a["shape"], "dtype": a["dtype"],
                    "min_bytes": a.get("min_bytes"), "class": shape_class(a.get("min_bytes") or 0, l2),
                    "triton_s": a.get("median_s"), "cuda_s": b.get("median_s"), "triton_over_cuda": ratio,
                    "winner": verdict(ratio)})
    return out


def _decide(winners: list[str]) -> str:
    decided = {w for w in winners if w in PAIR}
    if len(decided) == 1:
        return decided.pop()
    if len(decided) > 1:
        return "mixed"
    return "tie" if winners else "-"


def family_rule(rows: list[dict], auto_now: str | None) -> list[dict]:
    """Per op family: the measured winner by the rule of the module docstring, and what that means for auto."""
    out = []
    for op in sorted({r["op"] for r in rows}):
        mine = [r for r in rows if r["op"] == op and r["pass"] == "fwd+bwd"]
        by_class = {}
        for r in mine:
            by_class.setdefault(r["class"], []).append(r["winner"])
        training = _decide([w for c in TRAINING_CLASSES for w in by_class.get(c, [])])
        small = _decide(by_class.get("launch-bound", []))
        measured = training if training in PAIR + ("mixed",) else (small if small in PAIR else training)
        if measured in PAIR:
            action = "keep" if measured == auto_now else f"reorder: {measured} first"
        elif measured == "mixed":
            action = "mixed: decide per shape (see the cases)"
        else:
            action = "keep (no difference measured)" if measured == "tie" else "not measured"
        out.append({"op": op, "classes": {c: _decide(ws) for c, ws in sorted(by_class.items())},
                    "measured": measured, "auto_now": auto_now, "action": action})
    return out
