"""fastelbo/_build.py's locked build-and-load: a build killed mid-way leaves torch.utils.cpp_extension's
baton file `<build dir>/lock`, on which every later load() would wait forever. Under fastelbo's own flock
no other fastelbo process is building there, so the baton is stale and is removed first."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from fastelbo import _build


@pytest.mark.skipif(not _build.compatibility()[0], reason="no C++ toolchain to build with")
def test_stale_baton_does_not_hang_the_next_build(tmp_path):
    directory = tmp_path / "build"
    directory.mkdir()
    (directory / "lock").write_text("")  # what a build killed mid-way leaves behind
    source = tmp_path / "tiny.cpp"
    source.write_text('extern "C" int fastelbo_tiny() { return 7; }\n')
    # In a child process with a timeout: with the stale baton honoured, load() never returns.
    script = textwrap.dedent(f"""
        import ctypes
        from pathlib import Path
        from fastelbo import _build
        d = Path({str(directory)!r})
        _build._locked_load("fastelbo_tiny", [Path({str(source)!r})], [], d, extra_ldflags=())
        print(ctypes.CDLL(str(d / "fastelbo_tiny.so")).fastelbo_tiny())
    """)
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the build waited on the stale cpp_extension baton `lock`")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "7"
    assert not (directory / "lock").exists()


def test_every_extension_loads_through_one_routine(monkeypatch):
    # A failed build is remembered with the same message shape for each of the three extensions.
    monkeypatch.setattr(_build, "compatibility", lambda: (False, "no compiler here"))
    monkeypatch.setattr(_build, "cuda_compatibility", lambda: (False, "no compiler here"))
    for attr, load, what in [("_CPU", _build.load_cpu_extension, "fastelbo's C++ CPU kernels"),
                             ("_CUDA", _build.load_cuda_extension, "fastelbo's CUDA kernels"),
                             ("_EMU", _build.load_emulated_extension, "the emulated CUDA kernels")]:
        state = _build._State()
        monkeypatch.setattr(_build, attr, state)
        for _ in range(2):  # the second call raises the remembered error
            with pytest.raises(_build.BuildError, match=f"^{re.escape(what)}.* cannot be built here: no compiler here"):
                load()
        assert not state.loaded
