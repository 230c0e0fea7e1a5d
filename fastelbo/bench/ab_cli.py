"""``fastelbo bench --against`` and ``fastelbo bench --count``: from the
command line's arguments to sides, items, the run and its exit status
(fastelbo/commands/bench.py hands over here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import ab, ab_sides, counts
from .ab_sides import SideError

SKIPPED = 3  # exit status of a count check that could not run here: neither a pass nor a failure


def _err(msg: str) -> int:
    print(f"fastelbo bench: {msg}", file=sys.stderr)
    return 2


def repo_of(args) -> Path:
    """The git checkout whose revisions are compared: --repo, else fastelbo's own checkout."""
    if args.repo:
        return ab_sides.repo_root(Path(args.repo))
    here = ab_sides.this_checkout()
    if here is None:
        raise SideError("this fastelbo is not a git checkout (installed from a wheel?): --against compares "
                        "revisions of a checkout; pass --repo DIR")
    return ab_sides.repo_root(here)


def make_sides(args, repo: Path):
    """(A, B): A the revision of --against (default: the merge base with main), B the working tree or
    --candidate (a revision or a directory)."""
    if args.against:
        a = ab_sides.side_from_revision("A", repo, args.against)
    else:
        commit, how = ab_sides.default_base(repo)
        a = ab_sides.side_from_revision("A", repo, commit, how)
    if args.candidate and not Path(args.candidate).is_dir():
        b = ab_sides.side_from_revision("B", repo, args.candidate)
    else:
        path = Path(args.candidate) if args.candidate else repo
        b = ab_sides.side_from_path("B", path, own_cache=bool(args.candidate))
    return a, b


def working_side(args) -> ab_sides.Side:
    """The side a plain --count measures: --candidate, else this checkout, else the installed fastelbo."""
    if args.candidate:
        if Path(args.candidate).is_dir():
            return ab_sides.side_from_path("B", Path(args.candidate))
        return ab_sides.side_from_revision("B", repo_of(args), args.candidate)
    if args.repo:
        return ab_sides.side_from_path("B", ab_sides.repo_root(Path(args.repo)), own_cache=False)
    here = ab_sides.this_checkout()
    if here is not None:
        return ab_sides.side_from_path("B", here, own_cache=False)
    return ab_sides.Side("B", "the installed fastelbo", None)


def workload_names(side, workload: str) -> list[str]:
    w = ab_sides.WorkerProcess(side, workload=workload)
    try:
        r = w.call({"cmd": "names"})
    finally:
        w.close()
    if not r["ok"]:
        raise SideError(f"workload {workload} on side {side.label}: {r['error']}\n{w.log_tail()}")
    return r["names"]


def items_for(args, case_list, side) -> list[dict]:
    if args.workload:
        return ab.workload_items(workload_names(side, args.workload))
    from . import cases as C

    backends = [i[len(C.FASTELBO_PREFIX):] for i in (args.impls.split(",") if args.impls else [])
                if i.startswith(C.FASTELBO_PREFIX)]
    device = "cuda" if args.device == "cuda" else "cpu"
    items = []
    for b in backends or ["cuda" if device == "cuda" else "cpu"]:
        items += ab.case_items(case_list, b, device)
    return items


def _write(doc: dict, path: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {p}")


def _absolute_workload(args) -> None:
    """FILE:FUNCTION with FILE made absolute: the workers may not share the caller's directory."""
    if args.workload:
        path, sep, func = args.workload.rpartition(":")
        if sep and path:
            args.workload = f"{Path(path).resolve()}:{func}"


def run_against(args, case_list) -> int:
    """The A/B timing run; exit 1 for a significant slowdown above --threshold, 2 when a case failed to run."""
    _absolute_workload(args)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        repo = repo_of(args)
        a, b = make_sides(args, repo)
        items = items_for(args, case_list, b)
        threshold = args.threshold if args.threshold is not None else ab.DEFAULT_THRESHOLD
        doc = ab.run_ab(a, b, items, pairs=args.pairs or ab.DEFAULT_PAIRS,
                        min_round_s=(args.min_round_ms / 1e3) if args.min_round_ms else ab.DEFAULT_MIN_ROUND_S,
                        threshold=threshold, alpha=args.alpha,
                        resolution=args.resolution if args.resolution is not None else threshold,
                        statistic=args.statistic, threads=args.threads,
                        workload=args.workload)
    except SideError as exc:
        return _err(str(exc))
    print(ab.format_ab(doc))
    _write(doc, args.json or "bench-results/fastelbo-ab.json")
    return ab.exit_status(doc)


def run_count(args, case_list, explicit_selection: bool) -> int:
    """Instruction counts: of one side (a table, a baseline, a check against one) or, with --against, of both.
    Exit 1: a count above the tolerance; 2: a case failed to run; 3 (SKIPPED): counting is impossible here
    or the baseline holds for another build."""
    _absolute_workload(args)
    tolerance = args.threshold if args.threshold is not None else counts.DEFAULT_TOLERANCE
    try:
        counts.check_available()
    except counts.Unavailable as exc:
        print(f"SKIPPED: instruction counts unavailable: {exc}")
        return SKIPPED
    baseline = None
    if args.compare:
        baseline = json.loads(Path(args.compare).read_text())
        if baseline.get("schema") != counts.SCHEMA:
            return _err(f"{args.compare} is not a count baseline (schema {baseline.get('schema')!r}, expected "
                        f"{counts.SCHEMA!r}; ratio baselines go without --count)")
    try:
        if args.against is not None:
            repo = repo_of(args)
            a, b = make_sides(args, repo)
            sides = (a, b)
        else:
            sides = (working_side(args),)
        if baseline is not None and not explicit_selection and not args.workload:
            items = [{"key": k, "prepare": _prepare_of(k)} for k in baseline["counts"]]
        else:
            items = items_for(args, case_list, sides[-1])
        results = [counts.count_side(s, items, progress=lambda m: print(m, file=sys.stderr, flush=True))
                   for s in sides]
    except counts.Unavailable as exc:
        print(f"SKIPPED: instruction counts unavailable: {exc}")
        return SKIPPED
    except SideError as exc:
        return _err(str(exc))
    for r in results:
        print(f"side {r['side']['label']}: {r['side']['description']}")
        print(counts.format_counts(r))
    status = 0
    errors = sum("error" in v for r in results for v in r["counts"].values())
    doc = {"schema": "fastelbo-count-run/1", "results": results, "tolerance": tolerance}
    if len(results) == 2:
        rows = counts.compare_counts(results[0]["counts"], results[1]["counts"], tolerance)
        doc["rows"] = rows
        print("\n" + counts.format_rows(rows, "A/B on instruction counts (deterministic: any change is real)",
                                        tolerance, "A", "B"))
        status = 1 if any(r["status"] == "REGRESSION" for r in rows) else 0
    if baseline is not None:
        why = counts.not_comparable(results[-1]["build"], baseline["build"])
        if why:
            print(f"\nSKIPPED: the count baseline {args.compare} holds for another build ({'; '.join(why)}); "
                  "record one for this build with --count --save-baseline")
            doc["baseline_check"] = {"skipped": why}
            if status == 0:
                status = SKIPPED
        else:
            tol = args.threshold if args.threshold is not None else baseline.get("tolerance", tolerance)
            rows = counts.compare_counts(baseline["counts"], results[-1]["counts"], tol)
            doc["baseline_check"] = {"rows": rows, "tolerance": tol}
            print("\n" + counts.format_rows(rows, f"check against {args.compare}", tol))
            if any(r["status"] in ("REGRESSION", "missing", "error") for r in rows):
                status = 1
    if args.save_baseline:
        base = counts.baseline_doc(results[-1], tolerance)
        _write(base, args.save_baseline)
    _write(doc, args.json or "bench-results/fastelbo-counts.json")
    if status == 0 and errors:
        status = 2
    return status


def _prepare_of(key: str) -> dict:
    op, pass_, shape, dtype, backend = key.split("/")
    return {"case": f"{op}/{pass_}/{shape}/{dtype}", "backend": backend, "device": "cpu"}


__all__ = ["run_against", "run_count"]
