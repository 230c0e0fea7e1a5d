"""Versions stage: what this machine has, printed and written to --out (JSON).

Python and its packages (torch, triton, numpy, pytest, ...), torch's CUDA and
cuDNN, the GPU (name, compute capability, SMs, memory, L2 cache), the driver,
the CUDA tools (nvcc, compute-sanitizer, ncu, cuobjdump, nvdisasm), the CPU
and fastelbo itself. Every probe is allowed to fail: a missing tool is
recorded as such, never an error of the stage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "triton", "numpy", "pytest", "hypothesis", "pytest-benchmark", "matplotlib", "setuptools",
            "ninja", "fastelbo")
TOOLS = {"nvcc": "release", "compute-sanitizer": "Version", "ncu": "Version", "cuobjdump": "release",
         "nvdisasm": "release", "nvidia-smi": None}


def _first_line(argv: list[str], pick: str | None) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"not run: {exc}"
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    if pick:
        lines = [ln for ln in lines if pick in ln] or lines
    return lines[0] if lines else f"no output (exit {proc.returncode})"


def _tool(name: str, pick: str | None) -> dict:
    path = shutil.which(name)
    if path is None:
        from gpucheck.stages import find_compute_sanitizer

        if name == "compute-sanitizer":
            path = find_compute_sanitizer()
        else:
            for home in filter(None, (os.environ.get("CUDA_HOME"), "/usr/local/cuda")):
                candidate = Path(home) / "bin" / name
                if candidate.is_file():
                    path = str(candidate)
                    break
    if path is None:
        return {"path": None, "version": "not found"}
    return {"path": path, "version": _first_line([path, "--version"], pick)}


def _gpu() -> dict:
    import torch

    info = {"cuda_available": torch.cuda.is_available(), "device_count": 0}
    if not info["cuda_available"]:
        return info
    info["device_count"] = torch.cuda.device_count()
    p = torch.cuda.get_device_properties(0)
    info.update({"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                 "memory_bytes": p.total_memory, "l2_bytes": getattr(p, "L2_cache_size", None)})
    smi = shutil.which("nvidia-smi")
    if smi:
        info["nvidia_smi"] = _first_line([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                          "clocks.max.memory,power.limit", "--format=csv,noheader"], None)
    return info


def _cpu() -> dict:
    model, mem = platform.processor(), None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "memory": mem}


def collect(root: Path) -> dict:
    out: dict = {"python": sys.version.split()[0], "python_executable": sys.executable,
                 "platform": platform.platform(), "cpu": _cpu()}
    pkgs = {}
    for name in PACKAGES:
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pkgs[name] = None
    out["packages"] = pkgs
    try:
        import torch

        out["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
        out["gpu"] = _gpu()
    except Exception as exc:  # torch itself broken: the rest still tells what is here
        out["torch"] = {"error": f"{type(exc).__name__}: {exc}"}
    out["tools"] = {name: _tool(name, pick) for name, pick in TOOLS.items() if name != "nvidia-smi"}
    try:
        import fastelbo

        out["fastelbo"] = {"version": fastelbo.__version__, "path": fastelbo.__file__}
    except Exception as exc:
        out["fastelbo"] = {"error": f"{type(exc).__name__}: {exc}"}
    head = _first_line(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], None)
    out["checkout"] = {"root": str(root), "commit": head if len(head) < 16 and " " not in head else None}
    return out


def format_lines(v: dict) -> list[str]:
    lines = [f"python {v['python']} ({v['python_executable']}); {v['platform']}",
             f"cpu: {v['cpu']['model']}, {v['cpu']['cores']} cores, {v['cpu']['memory']}",
             "packages: " + ", ".join(f"{k} {x or '-'}" for k, x in v["packages"].items())]
    t = v.get("torch", {})
    lines.append(f"torch {t.get('version')} (CUDA {t.get('cuda')}, cuDNN {t.get('cudnn')})" if "error" not in t
                 else f"torch: {t['error']}")
    g = v.get("gpu") or {}
    if g.get("cuda_available"):
        lines.append(f"gpu: {g['name']} (sm_{g['capability'].replace('.', '')}, {g['sms']} SMs, "
                     f"{g['memory_bytes'] / 2**30:.1f} GiB, L2 {(g.get('l2_bytes') or 0) / 2**20:.0f} MiB); "
                     f"{g.get('nvidia_smi', '')}")
    else:
        lines.append("gpu: none visible to torch (torch.cuda.is_available() is False)")
    for name, tool in v["tools"].items():
        lines.append(f"{name}: {tool['version']}" + (f" ({tool['path']})" if tool["path"] else ""))
    lines.append(f"fastelbo: {v.get('fastelbo')}; checkout {v['checkout']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--root", type=Path, default=Path.cwd())
    args = p.parse_args(argv)
    v = collect(args.root)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(v, indent=1))
    print("\n".join(format_lines(v)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
