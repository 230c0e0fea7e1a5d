"""Build stage: the C++ CPU and the CUDA extensions, built at the same time.

Each is built in its own process (fastelbo.commands.build's build_cpu /
build_cuda, what `fastelbo build` runs), with ninja running MAX_JOBS
compiles (the stage sets it to the core count); both are timed, with the
seconds of every compile from ninja's log. Then `fastelbo info` is saved to
--info. Later stages load the cached builds: the test stage's conftest asks
every backend whether it runs, which would otherwise build inside the
stage's time cap.

    python -m gpucheck.build_ext --out build.json --info info.txt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _ninja_times(directory: str | None, since: float) -> list[dict]:
    """(target, seconds) of the build that ran in a build directory after `since`, slowest first; [] when
    the extension came from the cache."""
    if not directory:
        return []
    log = Path(directory) / ".ninja_log"
    try:
        if log.stat().st_mtime < since:
            return []
        lines = log.read_text().splitlines()
    except OSError:
        return []
    rows = {}
    for line in lines:
        parts = line.split("\t")
        if len(parts) >= 4 and parts[0].isdigit():
            rows[parts[3]] = (int(parts[1]) - int(parts[0])) / 1000.0
    return [{"target": t, "seconds": s} for t, s in sorted(rows.items(), key=lambda kv: -kv[1])]


def worker(kind: str) -> dict:
    from fastelbo import _build
    from fastelbo.commands import build as B

    since = time.time()
    ok, where, seconds = (B.build_cpu() if kind == "cpu" else B.build_cuda())
    entry = {"ok": ok, "seconds": round(seconds, 1)}
    if ok:
        entry["dir"] = where
        entry["compiles"] = _ninja_times(where, since)
    else:
        entry["error"] = where
    if kind == "cuda":
        import torch

        entry["arch_flags"] = _build.cuda_arch_flags() or (
            f"torch's choice: the visible GPU, sm_{''.join(map(str, torch.cuda.get_device_capability()))}"
            if torch.cuda.is_available() else "torch's choice")
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--info", type=Path)
    p.add_argument("--worker", choices=("cpu", "cuda"))
    p.add_argument("--result", type=Path)
    args = p.parse_args(argv)
    if args.worker:
        entry = worker(args.worker)
        args.result.write_text(json.dumps(entry))
        return 0

    t0 = time.monotonic()
    result: dict = {"max_jobs": os.environ.get("MAX_JOBS"), "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for kind in ("cuda", "cpu"):  # the CUDA build is the longer one: first
            res = Path(tmp) / f"{kind}.json"
            procs[kind] = (subprocess.Popen([sys.executable, "-m", "gpucheck.build_ext", "--worker", kind,
                                             "--result", str(res)]), res)
        for kind, (proc, res) in procs.items():
            rc = proc.wait()
            try:
                result[kind] = json.loads(res.read_text())
            except (OSError, ValueError):
                result[kind] = {"ok": False, "error": f"the {kind} build process exited with status {rc} and no result"}
    result["seconds"] = round(time.monotonic() - t0, 1)
    for kind in ("cpu", "cuda"):
        e = result[kind]
        state = {True: "built", False: "FAILED", None: "not buildable here"}[e.get("ok")]
        print(f"{kind}: {state} in {e.get('seconds', 0)} s" + (f": {e['dir']}" if e.get("ok") else
                                                                f"\n{e.get('error', '')}"))
        for c in (e.get("compiles") or [])[:4]:
            print(f"   {c['seconds']:7.1f} s  {c['target']}")
    print(f"both in {result['seconds']} s with MAX_JOBS={result['max_jobs']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    if args.info:
        try:
            proc = subprocess.run([sys.executable, "-m", "fastelbo.cli", "info"], capture_output=True, text=True,
                                  timeout=60)
            args.info.write_text(proc.stdout + proc.stderr)
            print(proc.stdout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            args.info.write_text(f"fastelbo info did not finish: {exc}\n")
    # The check is for a GPU machine: CUDA kernels that cannot be built are a failure of the stage too.
    return 0 if result["cpu"].get("ok") and result["cuda"].get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
