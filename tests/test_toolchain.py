"""Which ninja builds, and what a user sees while it does (fastelbo/_toolchain.py, fastelbo/_build_notice.py).

Issue 21: with two ninja programs installed, torch's build ran whichever came first on PATH; the two
cannot read each other's build log, so switching between the `fastelbo` command and `python script.py`
(different PATH orders) rebuilt all seven objects, 92-118 s each time. And a first build sat silent for
minutes."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fastelbo import _build, _build_notice, _toolchain

needs_toolchain = pytest.mark.skipif(not _build.compatibility()[0], reason="no C++ toolchain to build with")
# Without the ninja pip package the first ninja on PATH builds (in a directory of its own): another one
# first on PATH is then a build of its own, once, which these end-to-end tests would wait for.
needs_pip_ninja = pytest.mark.skipif(_toolchain._pip_ninja() is None, reason="the ninja pip package is not installed")


def _fake_ninja(directory: Path, log: Path) -> Path:
    """A second ninja program: another version string, logging every call, building with the real one."""
    real = str(_toolchain.ninja().path)
    directory.mkdir(parents=True, exist_ok=True)
    fake = directory / "ninja"
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$@" >> {str(log)!r}
        if [ "$1" = "--version" ]; then echo 1.10.0.fake; exit 0; fi
        exec {real!r} "$@"
    """))
    fake.chmod(0o755)
    return fake


def _path_with_first(directory: Path) -> str:
    return str(directory) + os.pathsep + os.environ.get("PATH", "")


def test_the_choice_does_not_follow_path_order(tmp_path, monkeypatch):
    chosen = _toolchain.ninja()
    _fake_ninja(tmp_path / "bin", tmp_path / "calls.log")
    monkeypatch.setenv("PATH", _path_with_first(tmp_path / "bin"))
    if _toolchain._pip_ninja() is not None:  # the pip package's ninja wins wherever PATH puts another
        assert _toolchain.ninja() == chosen and chosen.why == "the ninja pip package"
    else:  # the first on PATH, whose path and version key the cache (test below)
        assert _toolchain.ninja().version == "1.10.0.fake"


def test_the_cache_key_holds_ninja_and_compiler(tmp_path, monkeypatch):
    fake = _fake_ninja(tmp_path / "bin", tmp_path / "calls.log")
    base = _toolchain.cache_key()
    monkeypatch.setenv("FASTELBO_NINJA", str(fake))
    assert _toolchain.ninja().version == "1.10.0.fake"
    other_ninja = _toolchain.cache_key()
    assert other_ninja != base and "1.10.0.fake" in other_ninja
    sources = _build.cpu_sources()
    monkeypatch.delenv("FASTELBO_NINJA")
    a = _build._fingerprint(sources, ["-O3"], ("cpu",))
    monkeypatch.setenv("FASTELBO_NINJA", str(fake))
    assert _build._fingerprint(sources, ["-O3"], ("cpu",)) != a  # another ninja: another build directory
    monkeypatch.delenv("FASTELBO_NINJA")
    cc = shutil.which("gcc") or shutil.which("clang")
    if cc and Path(cc).resolve() != _toolchain.compiler().path:
        monkeypatch.setenv("CXX", cc)
        assert _toolchain.cache_key() != base


def test_missing_explicit_ninja_is_named(monkeypatch):
    monkeypatch.setenv("FASTELBO_NINJA", "/nonexistent/ninja")
    with pytest.raises(_toolchain.ToolchainError, match="FASTELBO_NINJA='/nonexistent/ninja'"):
        _toolchain.ninja()
    ok, why = _build.compatibility()
    assert not ok and "FASTELBO_NINJA" in why


@needs_toolchain
@needs_pip_ninja
def test_a_second_ninja_first_on_path_rebuilds_nothing(tmp_path):
    # The real situation: a build, then a process whose PATH puts another ninja program first. On
    # the old code torch ran that one (its calls land in the log) and it rebuilt every object.
    log = tmp_path / "calls.log"
    fake_dir = tmp_path / "bin"
    _fake_ninja(fake_dir, log)
    source = tmp_path / "tiny.cpp"
    source.write_text('extern "C" int fastelbo_tiny() { return 7; }\n')
    directory = tmp_path / "build"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from fastelbo import _build
        _build._locked_load("fastelbo_tiny", [Path({str(source)!r})], [], Path({str(directory)!r}),
                            extra_ldflags=())
    """)
    env = dict(os.environ, FASTELBO_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("FASTELBO_NINJA", None)
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "fastelbo: building fastelbo_tiny" in first.stderr  # the first build says so
    obj = directory / "tiny.o"
    built = obj.stat().st_mtime_ns
    for path in (_path_with_first(fake_dir), os.environ.get("PATH", "")):
        again = subprocess.run([sys.executable, "-c", script], env=dict(env, PATH=path), capture_output=True,
                               text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert obj.stat().st_mtime_ns == built, "the object was rebuilt"
        assert "fastelbo:" not in again.stderr  # a cache hit is quiet
    calls = log.read_text() if log.exists() else ""
    assert "-v" not in calls.split(), f"torch ran the other ninja: {calls!r}"


@needs_toolchain
@needs_pip_ninja
def test_cpu_kernels_are_not_rebuilt_with_another_ninja_first_on_path(tmp_path):
    # The seven-object CPU extension the test session has loaded: loading it again from a process
    # whose PATH starts with another ninja program is a cache hit, silent, and builds nothing.
    _build.load_cpu_extension()
    library = _build._CPU.library
    before = library.stat().st_mtime_ns
    fake_dir = tmp_path / "bin"
    _fake_ninja(fake_dir, tmp_path / "calls.log")
    env = dict(os.environ, PATH=_path_with_first(fake_dir))
    env.pop("FASTELBO_NINJA", None)
    out = subprocess.run([sys.executable, "-c", "from fastelbo import _build; _build.load_cpu_extension(); "
                          "print(_build._CPU.library)"], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == str(library)  # the same build directory
    assert library.stat().st_mtime_ns == before
    assert "fastelbo: building" not in out.stderr and "still building" not in out.stderr


# ---------------------------------------------------------------------------
# The build notice
# ---------------------------------------------------------------------------
def test_a_first_build_says_what_where_how_long_and_when_done(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTELBO_QUIET_BUILD", raising=False)
    stream = io.StringIO()
    with _build_notice.announce("the kernels", tmp_path, tmp_path / "k.so", 7, period=0.05, stream=stream):
        (tmp_path / "a.o").write_text("")
        time.sleep(0.3)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("fastelbo: building the kernels (7 files, first use; about ")
    assert str(tmp_path) in lines[0]
    assert any(ln.startswith("fastelbo: still building the kernels: 1/7 files compiled, ") for ln in lines[1:-1])
    assert lines[-1].startswith("fastelbo: built the kernels in ")


def test_a_cached_load_is_quiet_and_a_slow_one_speaks_up(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTELBO_QUIET_BUILD", raising=False)
    (tmp_path / "k.so").write_text("")
    stream = io.StringIO()
    with _build_notice.announce("the kernels", tmp_path, tmp_path / "k.so", 7, period=0.2, stream=stream):
        pass
    assert stream.getvalue() == ""
    with _build_notice.announce("the kernels", tmp_path, tmp_path / "k.so", 7, period=0.05, stream=stream):
        time.sleep(0.3)  # ninja found something to rebuild
    assert "fastelbo: building the kernels" in stream.getvalue()
    assert stream.getvalue().splitlines()[-1].startswith("fastelbo: built the kernels in ")


def test_a_failed_build_says_so_and_quiet_silences(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTELBO_QUIET_BUILD", raising=False)
    stream = io.StringIO()
    with pytest.raises(RuntimeError):
        with _build_notice.announce("the kernels", tmp_path, tmp_path / "k.so", 2, period=5, stream=stream):
            raise RuntimeError("compiler error")
    assert stream.getvalue().splitlines()[-1].startswith("fastelbo: failed to build the kernels in ")
    monkeypatch.setenv("FASTELBO_QUIET_BUILD", "1")
    quiet = io.StringIO()
    with _build_notice.announce("the kernels", tmp_path, tmp_path / "k.so", 2, period=0.01, stream=quiet):
        time.sleep(0.05)
    assert quiet.getvalue() == ""


def test_the_estimate_scales_with_files_per_core():
    assert _build_notice.estimate(7, cores=2) == "60 s to 4 minutes"
    assert _build_notice.estimate(2, cores=16) == "15 s to 60 s"
