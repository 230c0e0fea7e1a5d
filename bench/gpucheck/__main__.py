"""python -m gpucheck OUT_DIR [--dry-run] [--only ...] [--skip ...]: see bench/gpu_check.sh."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import runner, stages


def _names(text: str | None) -> set[str] | None:
    return {n.strip() for n in text.split(",") if n.strip()} if text else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=(
        "fastelbo's GPU check: install, build, tests on CUDA tensors, compute-sanitizer, benchmarks; each stage "
        "under a time cap, a JSON and a markdown report in OUT_DIR."))
    p.add_argument("out", type=Path, help="directory for the report, the logs, the bench JSON and PNG")
    p.add_argument("--dry-run", action="store_true", help="print the stages, their commands and caps; run nothing")
    p.add_argument("--budget-s", type=float, default=stages.BUDGET_S,
                   help=f"seconds for the whole check (default {stages.BUDGET_S:.0f}); the planned caps must fit")
    p.add_argument("--work", type=Path, default=None,
                   help="caches and the environment (default: $TMPDIR/fastelbo-gpu-check); not part of the report")
    p.add_argument("--cores", type=int, default=None, help="cores to plan for (default: all)")
    p.add_argument("--only", help="comma-separated stages or groups to run (the others are left out)")
    p.add_argument("--skip", help="comma-separated stages or groups to leave out")
    args = p.parse_args(argv)

    root = Path(__file__).resolve().parents[2]
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / "fastelbo-gpu-check"
    cores = args.cores or os.cpu_count() or 1
    paths = stages.Paths(root=root, out=args.out.resolve(), work=work.resolve())
    groups = stages.build_plan(paths, cores)
    if args.dry_run:
        return runner.dry_run(paths, groups, args.budget_s, cores)
    if stages.planned_total(groups) > args.budget_s + 1e-6:
        print(f"the stages' caps ({stages.planned_total(groups):.0f} s) do not fit --budget-s {args.budget_s:.0f}",
              file=sys.stderr)
        return 2
    return runner.Runner(paths, groups, args.budget_s, cores, only=_names(args.only),
                         skip=_names(args.skip) or set()).run()


if __name__ == "__main__":
    sys.exit(main())
