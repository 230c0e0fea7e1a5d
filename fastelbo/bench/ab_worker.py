"""One side of an A/B run: a worker process that imports *its own* checkout of
fastelbo (or of a project using it) and times or counts what the parent asks.

Run by fastelbo.bench.ab and fastelbo.bench.counts as a script, never imported
by fastelbo itself: two builds of fastelbo cannot live in one process (both
register torch.ops.fastelbo::*), so each side gets a process.

    python <this file> '<json config>'

config: {"mapping": {package: directory}, "paths": [dirs for sys.path],
         "cases_file": path of the driver's fastelbo/bench/cases.py,
         "workload": "FILE:FUNCTION" or null, "threads": int or null,
         "helper": path of the callgrind helper library or null}

Import shim: the checkout's packages are mapped to their directories by a
meta path finder placed first on sys.meta_path, the way setuptools' own
package-dir table maps them (kernels/ -> fastelbo.kernels, csrc/ ->
fastelbo.csrc). Nothing is installed and nothing is written into the tree, so
the working tree itself can be one side, and an editable or regular install of
fastelbo in the environment cannot shadow the side's copy.

Protocol: one JSON object per line on stdin, one JSON reply per line on the
original stdout (fd 1 is pointed at stderr first, so what native code or a
build prints cannot corrupt the replies).
"""

from __future__ import annotations

import gc
import importlib.abc
import importlib.util
import json
import os
import sys
import time
import traceback
import types

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # run as a script: its folder (fastelbo/bench) must not shadow top-level names


class TreeFinder(importlib.abc.MetaPathFinder):
    """Finds the mapped packages in their directories; their submodules are then
    found through the package's __path__ by the ordinary path finder."""

    def __init__(self, mapping: dict):
        self.mapping = {name: os.path.abspath(d) for name, d in mapping.items()}

    def find_spec(self, fullname, path=None, target=None):
        directory = self.mapping.get(fullname)
        if directory is None:
            return None
        init = os.path.join(directory, "__init__.py")
        if not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[directory])


def install_tree(mapping: dict, paths: list) -> None:
    for p in reversed(paths or []):
        sys.path.insert(0, os.path.abspath(p))
    if mapping:
        sys.meta_path.insert(0, TreeFinder(mapping))


def load_cases(cases_file: str):
    """The driver's case definitions, bound to this side's fastelbo: both sides time
    the same workload and only the library under test differs. Loaded as
    fastelbo._ab.cases so its `from .. import reference` resolves to this side."""
    import fastelbo

    pkg = types.ModuleType("fastelbo._ab")
    pkg.__path__ = []
    sys.modules["fastelbo._ab"] = pkg
    spec = importlib.util.spec_from_file_location("fastelbo._ab.cases", cases_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastelbo._ab.cases"] = module
    spec.loader.exec_module(module)
    assert fastelbo  # imported first so the relative import finds this side's package
    return module


def load_workload(spec: str) -> dict:
    """FILE:FUNCTION -> {name: callable}; FUNCTION() returns a dict of zero-argument
    callables (or one callable, named after the function)."""
    path, _, func = spec.rpartition(":")
    if not path or not func:
        raise ValueError(f"workload must be FILE:FUNCTION, got {spec!r}")
    modspec = importlib.util.spec_from_file_location("_fastelbo_ab_workload", path)
    module = importlib.util.module_from_spec(modspec)
    modspec.loader.exec_module(module)
    made = getattr(module, func)()
    return dict(made) if isinstance(made, dict) else {func: made}


class Callgrind:
    """The client requests of valgrind/callgrind.h, through a small helper library
    (fastelbo.bench.counts builds it): instrumentation starts only after the
    imports and the warm-up calls, which are minutes under full instrumentation."""

    def __init__(self, path: str):
        import ctypes

        self.lib = ctypes.CDLL(path)
        self.lib.fastelbo_cg_dump.argtypes = [ctypes.c_char_p]

    def count(self, fn, calls: int, labels: list) -> None:
        """One dump per label, each of `calls` calls, in one instrumented window: the next
        case's warm-up runs at valgrind's uninstrumented speed (each start flushes the
        translations, a second or two)."""
        self.lib.fastelbo_cg_start()
        for label in labels:
            self.lib.fastelbo_cg_zero()
            self.lib.fastelbo_cg_toggle()
            for _ in range(calls):
                fn()
            self.lib.fastelbo_cg_toggle()
            self.lib.fastelbo_cg_dump(label.encode())
        self.lib.fastelbo_cg_stop()


class Worker:
    def __init__(self, config: dict):
        self.config = config
        self.items: dict = {}
        self.cases = None
        self.workload = None
        self.callgrind = Callgrind(config["helper"]) if config.get("helper") else None
        self.device = "cpu"
        self.spacer = None

    # -- commands ----------------------------------------------------------
    def hello(self, msg):
        import torch

        import fastelbo

        if self.config.get("threads"):
            torch.set_num_threads(int(self.config["threads"]))
        out = {"pid": os.getpid(), "fastelbo_file": fastelbo.__file__,
               "version": getattr(fastelbo, "__version__", None),
               "torch": torch.__version__, "python": sys.version.split()[0], "threads": torch.get_num_threads(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability()}
        try:
            import fastelbo.kernels as kernels

            out["kernels_file"] = kernels.__file__
        except Exception as exc:  # an old or foreign tree may not have them
            out["kernels_file"] = f"unavailable: {exc}"
        if msg.get("build"):
            from fastelbo import _build

            _build.load_cpu_extension()
            out["cpu_library"] = str(getattr(_build._CPU, "library", None) or _build._CPU.path)
        return out

    def prepare(self, msg):
        item_id = msg["id"]
        fn = self._build(msg, spacer=0)
        t0 = time.perf_counter()
        for _ in range(msg.get("warmup", 3)):
            fn()
        self.items[item_id] = (msg, fn)
        return {"warmup_s": time.perf_counter() - t0}

    def reinput(self, msg):
        """Fresh inputs for a case, placed after a spacer of msg["spacer"] bytes: where the inputs land
        (their offsets within a page) moves a tiny case's time by up to 10% on this machine, and
        one placement kept for a whole case would be a difference between the processes."""
        old, _ = self.items[msg["id"]]
        self.items.pop(msg["id"])
        fn = self._build(old, spacer=int(msg.get("spacer", 0)))
        fn()
        self.items[msg["id"]] = (old, fn)
        return {}

    def _build(self, msg, spacer: int):
        import torch

        if not msg.get("case"):  # a workload's callables own their inputs
            if self.workload is None:
                self.workload = load_workload(self.config["workload"])
            return self.workload[msg["name"]]
        if self.cases is None:
            self.cases = load_cases(self.config["cases_file"])
        C = self.cases
        op, pass_, shape, dtype = msg["case"].split("/")
        case = C.Case(op, pass_, C.parse_shape(shape), dtype)
        self.device = msg.get("device", "cpu")
        self.spacer = torch.empty(spacer, dtype=torch.uint8) if spacer else None  # kept until the next build
        t = C.make_inputs(case, self.device)
        _, fn = C.build(case, C.FASTELBO_PREFIX + msg["backend"], t)
        if torch.device(self.device).type == "cuda":
            inner = fn

            def fn():  # each timed call includes its kernels
                inner()
                torch.cuda.synchronize()
        return fn

    def names(self, msg):
        if self.workload is None:
            self.workload = load_workload(self.config["workload"])
        return {"names": list(self.workload)}

    def calibrate(self, msg):
        """Calls per round from the *fastest* call seen: a call that waited out a scheduler slice
        (tens of ms on a busy machine) would otherwise shrink every round of the case to one call."""
        _, fn = self.items[msg["id"]]
        target, calls = msg["min_round_s"], []
        clock = time.perf_counter
        while len(calls) < 3 or (sum(calls) < 3 * target and len(calls) < 100_000):
            t0 = clock()
            fn()
            calls.append(clock() - t0)
        fastest = max(min(calls), 1e-9)
        return {"iters": int(min(100_000, max(1, -(-target // fastest)))), "per_call_s": fastest}

    def time(self, msg):
        (_, fn), iters = self.items[msg["id"]], int(msg["iters"])
        fn()  # untimed: the other side just ran and took the caches
        enabled = gc.isenabled()
        gc.disable()
        clock, calls = time.perf_counter, []
        try:
            for _ in range(iters):
                t0 = clock()
                fn()
                calls.append(clock() - t0)
        finally:
            if enabled:
                gc.enable()
        return {"mean_s": sum(calls) / iters, "min_s": min(calls)}

    def count(self, msg):
        if self.callgrind is None:
            raise RuntimeError("count needs the callgrind helper (run under valgrind by fastelbo.bench.counts)")
        _, fn = self.items[msg["id"]]
        gc.collect()
        gc.disable()
        try:
            self.callgrind.count(fn, int(msg["calls"]), list(msg["labels"]))
        finally:
            gc.enable()
        return {}

    def drop(self, msg):
        self.items.pop(msg["id"], None)
        gc.collect()
        return {}


def main(argv) -> int:
    config = json.loads(argv[1])
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else written to stdout goes to the log
    sys.stdout = sys.stderr
    install_tree(config.get("mapping") or {}, config.get("paths") or [])
    worker = Worker(config)
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        cmd = msg.get("cmd")
        if cmd == "exit":
            break
        try:
            reply = getattr(worker, cmd)(msg)
            reply["ok"] = True
        except Exception as exc:  # reported to the parent, which decides
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
