"""``fastelbo bench``: the benchmark sweep from the command line.

    fastelbo bench                              quick subset (float32, 3 shapes), table + JSON + PNG
    fastelbo bench --full                       every shape, float32 and bfloat16
    fastelbo bench --ops step --shapes 4096x784x64 --dtypes float32,bfloat16 --profile
    fastelbo bench --compare bench/baseline.json   exit 1 if a speedup ratio fell > 15% below the baseline
    fastelbo bench --from-json results.json --compare bench/baseline.json   compare without re-running
    fastelbo bench --save-baseline bench/baseline.json   (re)write the committed baseline from this run

A/B and instruction counts (fastelbo/bench/ab.py, counts.py):
    fastelbo bench --against                    the working tree against the merge base with main, timed in
                                                alternating rounds; exit 1 for a significant slowdown > 10%
    fastelbo bench --against v0.1.0 --ops step --shapes 4096x784x64
    fastelbo bench --count --compare bench/counts.json   instructions per call (callgrind) against the baseline
    fastelbo bench --count --against HEAD       instruction counts of HEAD and of the working tree
"""

from __future__ import annotations

import os
import sys

from ._common import add_device_option, add_dtype_option, add_shape_option


def _csv(text):
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


def add_arguments(parser) -> None:
    what = parser.add_argument_group("what to run (default: the quick subset)")
    what.add_argument("--full", action="store_true", default=None,
                      help="the full sweep: every shape, float32 and bfloat16 (also FASTELBO_BENCH_FULL=1)")
    what.add_argument("--ops", help="comma-separated op families: rsample,kl,kl-learned,bernoulli,gaussian,elbo,step")
    what.add_argument("--passes", help="comma-separated passes: fwd,fwd+bwd")
    add_shape_option(what, None, "the sweep's; a family name of the full sweep works too", strict=False)
    add_dtype_option(what, None, "the sweep's")
    what.add_argument("--impls", help="comma-separated implementations, e.g. eager,compile,fastelbo-cpu "
                                      "(the speedup columns need eager and compile)")
    add_device_option(what, "cpu or cuda; auto: cuda when present, else cpu")
    what.add_argument("--threads", type=int, help="torch.set_num_threads before running")
    how = parser.add_argument_group("measurement")
    how.add_argument("--rounds", type=int, help="interleaved timing rounds per case (quick 11, full 15)")
    how.add_argument("--min-round-ms", type=float, help="minimum duration of one timing round (quick 4, full 10)")
    how.add_argument("--budget-s", type=float, help="maximum timing seconds per case (quick 2, full 6)")
    how.add_argument("--no-memory", action="store_true", help="skip the saved-for-backward and peak measurements")
    how.add_argument("--no-overhead", action="store_true", help="skip the per-call overhead table of the tiny case")
    how.add_argument("--profile", action="store_true",
                     help="also print a torch.profiler table of each fastelbo implementation per case")
    out = parser.add_argument_group("output and regression check")
    out.add_argument("--json", default=None, help="where to write the results JSON (default "
                                                    "bench-results/fastelbo-bench.json, -ab.json, -counts.json)")
    out.add_argument("--png", help="where to write the speedup plot (default: the JSON path with .png)")
    out.add_argument("--no-plot", action="store_true", help="write no PNG")
    out.add_argument("--from-json", metavar="RESULTS", nargs="+",
                     help="use results JSON(s) of earlier runs instead of running; with several, each ratio is the "
                          "median over the runs, or with --save-baseline the lowest (e.g. from three quiet runs)")
    out.add_argument("--compare", metavar="BASELINE", help="compare this run's speedup ratios with a baseline JSON; "
                                                           "exit 1 when one fell more than --tolerance below it")
    out.add_argument("--tolerance", type=float, default=None, help="allowed relative drop of a ratio (default 0.15)")
    out.add_argument("--retries", type=int, default=2,
                     help="with --compare: re-measure the cases that regressed up to this many times and keep each "
                          "ratio's best; a real regression persists, a burst of machine load does not (default 2)")
    out.add_argument("--save-baseline", metavar="PATH", help="write this run's ratios (with --count: its "
                                                              "instruction counts) as a baseline JSON")
    ab = parser.add_argument_group("A/B against a git revision, same machine, same run (no baseline file)")
    ab.add_argument("--against", metavar="REV", nargs="?", const="",
                    help="time (or with --count, count) REV's build against the working tree's, each in its own "
                         "worker process, rounds alternating A B B A; REV defaults to the merge base with main. "
                         "Exit 1 only for a case significantly slower by more than --threshold")
    ab.add_argument("--candidate", metavar="REV_OR_DIR",
                    help="side B: a revision or a directory (default: the working tree, uncommitted changes included)")
    ab.add_argument("--repo", metavar="DIR",
                    help="the git checkout whose revisions are compared (default: fastelbo's own); with --workload, "
                         "a project that uses fastelbo")
    ab.add_argument("--workload", metavar="FILE:FUNCTION",
                    help="time FUNCTION() of FILE (a dict of name -> zero-argument callable, built with each side's "
                         "code) instead of fastelbo's cases: a downstream project's own step")
    ab.add_argument("--threshold", type=float, default=None,
                    help="fail above this slowdown (default 0.10 for time, 0.02 for instruction counts)")
    ab.add_argument("--pairs", type=int, help="A/B round pairs per case (default 30: 15 ABBA blocks)")
    ab.add_argument("--alpha", type=float, default=0.05,
                    help="family-wise error rate of the A/B verdicts (default 0.05)")
    ab.add_argument("--resolution", type=float, default=None,
                    help="a significant A/B difference smaller than this counts as no difference (default: the "
                         "threshold; two processes of one build differed by up to 7%% on a busy machine)")
    ab.add_argument("--statistic", choices=("min", "mean"), default="min",
                    help="what one A/B round contributes: its fastest call (default: load only adds time) or its "
                         "mean per call (also sees costs that hit some calls only, and more of the machine's noise)")
    ab.add_argument("--count", action="store_true",
                    help="instructions executed per call under valgrind's callgrind (AVX2 build, 1 thread) instead "
                         "of time: deterministic. Alone: print them; with --compare: check a count baseline "
                         "(bench/counts.json); with --against: A/B on counts. Exit 3 when counting is not possible")


def _full_requested(args) -> bool:
    if args.full is not None:
        return bool(args.full)
    return os.environ.get("FASTELBO_BENCH_FULL", "").strip().lower() in {"1", "true", "yes", "on"}


def _select(args, C, count: bool = False):
    full = _full_requested(args)
    kw = {"shapes": (C.TINY,)} if count and not full else {}  # counting: the tiny shape unless told otherwise
    if args.ops:
        unknown = [o for o in _csv(args.ops) if o not in C.OPS]
        if unknown:
            raise ValueError(f"unknown op(s) {unknown}; choose from {', '.join(C.OPS)}")
        kw["ops"] = _csv(args.ops)
    if args.passes:
        bad = [p for p in _csv(args.passes) if p not in C.PASSES]
        if bad:
            raise ValueError(f"unknown pass(es) {bad}; choose from {', '.join(C.PASSES)}")
        kw["passes"] = tuple(_csv(args.passes))
    if args.shapes:
        kw["shapes"] = tuple(C.parse_shape(s) for s in _csv(args.shapes))
    if args.dtypes:
        bad = [d for d in _csv(args.dtypes) if d not in C.DTYPES]
        if bad:
            raise ValueError(f"unknown dtype(s) {bad}; choose from {', '.join(C.DTYPES)}")
        kw["dtypes"] = tuple(_csv(args.dtypes))
    mode = "full" if full else "quick"
    if any(k in kw for k in ("ops", "passes", "shapes", "dtypes")):
        mode = "custom"
    return C.sweep_cases(full=full, **kw), mode, full


def run(args) -> int:
    if args.against is not None or args.count:
        from ..bench import ab_cli
        from ..bench import cases as C

        try:
            case_list, _, _ = _select(args, C, count=args.count)
        except ValueError as exc:
            print(f"fastelbo bench: {exc}", file=sys.stderr)
            return 2
        if args.count:
            return ab_cli.run_count(args, case_list, explicit_selection=_explicit(args))
        return ab_cli.run_against(args, case_list)
    return _run_sweep(args)


def _explicit(args) -> bool:
    return any((args.ops, args.passes, args.shapes, args.dtypes, _full_requested(args)))


def _run_sweep(args) -> int:
    import torch

    args.json = args.json or "bench-results/fastelbo-bench.json"
    from ..bench import cases as C
    from ..bench import measure as M
    from ..bench import plot, report, sweep

    if args.from_json:
        docs = [report.load_json(p) for p in args.from_json]
        # A baseline is the lowest ratio of the runs, a comparison the median (report.merge_runs).
        doc = report.merge_runs(docs, "min" if args.save_baseline else "median") if len(docs) > 1 else docs[0]
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            print("fastelbo bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
            return 2
        try:
            case_list, mode, full = _select(args, C)
        except ValueError as exc:
            print(f"fastelbo bench: {exc}", file=sys.stderr)
            return 2
        if not case_list:
            print("fastelbo bench: the selection has no case", file=sys.stderr)
            return 2
        rounds, min_round_s, budget_s = sweep.FULL_TIMING if full else sweep.QUICK_TIMING
        timing = (args.rounds or rounds, (args.min_round_ms / 1e3) if args.min_round_ms else min_round_s,
                  args.budget_s or budget_s)
        try:
            doc = sweep.run_sweep(case_list, device, impls=_csv(args.impls), timing=timing,
                                  memory=not args.no_memory, overhead=not args.no_overhead, mode=mode)
        except ValueError as exc:
            print(f"fastelbo bench: {exc}", file=sys.stderr)
            return 2
    print(report.format_table(doc))
    if args.profile and not args.from_json:
        for case in case_list:
            t = C.make_inputs(case, device)
            for impl in doc["implementations"]:
                if impl.startswith(C.FASTELBO_PREFIX):
                    _, timed = C.build(case, impl, t)
                    print(f"\nprofile of 10 calls: {case.key} {impl} (a custom op's kernel time shows as the "
                          "self time of its GeneratedBackwardFor_<op> (forward) and fastelbo::<op>_backward rows)")
                    print(M.profile_table(timed, 10, device))
    if not args.from_json:
        path = report.write_json(doc, args.json)
        print(f"\nwrote {path}")
    if not args.no_plot:
        png = args.png or os.path.splitext(args.json if not args.from_json else args.from_json[0])[0] + ".png"
        if args.from_json and not args.png and os.path.exists(png):
            png = None  # never overwrite the plot that came with an earlier run unasked
        if png:
            print(f"wrote {plot.write_png(doc, png)}")
    if args.save_baseline:
        base = report.baseline_doc(doc, args.tolerance if args.tolerance is not None else report.DEFAULT_TOLERANCE)
        print(f"wrote baseline {report.write_json(base, args.save_baseline)}")
    if args.compare:
        baseline = report.load_json(args.compare)
        tol = args.tolerance if args.tolerance is not None else baseline.get("tolerance", report.DEFAULT_TOLERANCE)
        result = report.compare(doc, baseline, tol)
        if not args.from_json:
            for attempt in range(1, max(args.retries, 0) + 1):
                if result["ok"]:
                    break
                result = _remeasure(doc, baseline, result, tol, attempt)
        print("\n" + report.format_compare(result))
        if not args.from_json and doc.get("retries"):
            report.write_json(doc, args.json)  # with the re-measured ratios
        return 0 if result["ok"] else 1
    return 0


def _remeasure(doc, baseline, result, tol, attempt):
    """Runs the regressed cases again; each ratio keeps the best of all its measurements."""
    from ..bench import cases as C
    from ..bench import report, sweep

    keys = sorted({r["key"] for r in result["rows"] if r["status"] == "REGRESSION"})
    print(f"\nre-measuring {len(keys)} regressed case(s), attempt {attempt}", file=sys.stderr)
    by_case: dict = {}
    for key in keys:
        op, pass_, shape, dtype, backend = key.split("/")
        by_case.setdefault((op, pass_, shape, dtype), []).append(backend)
    rounds, min_round_s, budget_s = doc["timing"]["rounds"], doc["timing"]["min_round_s"], doc["timing"]["budget_s_per_case"]
    for (op, pass_, shape, dtype), backends in by_case.items():
        case = C.Case(op, pass_, C.parse_shape(shape), dtype)
        impls = [i for i in C.BASELINES if i in doc["implementations"]] + [C.FASTELBO_PREFIX + b for b in backends]
        rows = sweep.run_case(case, impls, doc["machine"]["device"], rounds, min_round_s, budget_s, memory=False,
                              copy_curve=doc["copy_bandwidth"]["curve"])
        for key, new in sweep.ratios_of(rows).items():
            old = doc["ratios"].setdefault(key, {})
            for metric, value in new.items():
                if metric != "busy":
                    if value > old.get(metric, 0.0):  # the best measurement wins, with its busy figure
                        old[metric] = value
                        old[f"busy_{metric}"] = new.get("busy")
            doc.setdefault("retries", []).append({"key": key, "attempt": attempt, "ratios": new})
    return report.compare(doc, baseline, tol)
