"""A deliberately slowed copy of a fastelbo revision: the test that the A/B
and count modes catch a slowdown (README, "Regression checks").

    python bench/slowed_tree.py /tmp/fastelbo-slowed [--rev HEAD]
    fastelbo bench --against HEAD --candidate /tmp/fastelbo-slowed --ops bernoulli,gaussian

The copy is `git archive REV` with one change: the CPU log-likelihood forward
(csrc/cpu/loglik.cpp) computes each row's term once more and throws it away
(an empty asm statement with a memory clobber keeps the compiler from merging
the two). Bernoulli and Gaussian forward kernels do twice the work; the
backward kernels, the fused ELBO and the step are untouched.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
from pathlib import Path

KERNEL = "csrc/cpu/loglik.cpp"
ORIGINAL = "      for (int64_t i = r0; i < r1; ++i) out[i] = static_cast<scalar_t>(term.forward(i, validate_x, bad));\n"
SLOWED = """      for (int64_t i = r0; i < r1; ++i) {
        // SLOWED ON PURPOSE by bench/slowed_tree.py: the row's term once more, kept by the barrier.
        auto wasted = term.forward(i, validate_x, bad);
        asm volatile("" : : "g"(&wasted) : "memory");
        out[i] = static_cast<scalar_t>(term.forward(i, validate_x, bad));
      }
"""


def slow_down(source: str) -> str:
    """The kernel source with the extra work; raises ValueError when the loop is not found verbatim."""
    if source.count(ORIGINAL) != 1:
        raise ValueError(f"{KERNEL}: the forward row loop this script edits was not found verbatim; "
                         "update ORIGINAL/SLOWED in bench/slowed_tree.py to the kernel's current loop")
    return source.replace(ORIGINAL, SLOWED)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", help="directory to create (must not exist)")
    parser.add_argument("--rev", default="HEAD", help="the revision to copy (default HEAD)")
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    if dest.exists():
        print(f"{dest} exists; give a new directory", file=sys.stderr)
        return 2
    repo = Path(__file__).resolve().parent.parent
    tar = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", args.rev], capture_output=True,
                         check=True).stdout
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest)
    kernel = dest / KERNEL
    kernel.write_text(slow_down(kernel.read_text()))
    print(f"{dest}: {args.rev} with the log-likelihood forward doing its rows twice ({KERNEL})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
