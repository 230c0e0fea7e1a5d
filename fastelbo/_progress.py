"""A dependency-free progress bar for long runs (fastelbo bench, estimate_log_likelihood)."""

from __future__ import annotations

import sys
import time


class Progress:
    """Plain-text progress bar on stderr: one line, redrawn in place on a tty,
    a line per step otherwise (CI logs)."""

    def __init__(self, total: int, stream=None, width: int = 28):
        self.total, self.done, self.width = max(total, 1), 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()

    def step(self, label: str) -> None:
        frac = self.done / self.total
        filled = int(self.width * frac)
        elapsed = time.perf_counter() - self.start
        eta = f" eta {elapsed / self.done * (self.total - self.done):4.0f}s" if self.done else ""
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done:>3}/{self.total} {elapsed:4.0f}s{eta}  {label}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.done += 1

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(f"done: {self.done} cases in {time.perf_counter() - self.start:.0f}s\n")
        self.stream.flush()
