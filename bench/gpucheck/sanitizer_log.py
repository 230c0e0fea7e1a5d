"""The verdict of one compute-sanitizer log (memcheck, racecheck or synccheck).

compute-sanitizer prefixes every line with '========= '; a report starts at a
line whose text begins right after the prefix and goes on over the indented
lines below it. Each report is attributed to fastelbo when it names one of
fastelbo's kernels (the namespace fastelbo:: or a file of csrc/cuda) and to
"other" (PyTorch's own kernels, the CUDA API) otherwise, so a finding in
PyTorch is not blamed on fastelbo and one in fastelbo is not lost among
PyTorch's. A log without its summary line is "incomplete" (the run was
stopped or crashed), never "clean".
"""

from __future__ import annotations

import re

PREFIX = "========= "
_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) errors?")
_RACE_SUMMARY = re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")
_NOT_REPORTS = ("ERROR SUMMARY", "RACECHECK SUMMARY", "LEAK SUMMARY", "COMPUTE-SANITIZER")
_OURS = re.compile(r"fastelbo::|csrc/cuda/")


def reports(text: str) -> list[str]:
    """The reports of a log, each as its lines joined (prefix removed)."""
    out: list[list[str]] = []
    for line in text.splitlines():
        if not line.startswith(PREFIX.rstrip()):
            continue
        body = line[len(PREFIX):] if line.startswith(PREFIX) else ""
        if not body.strip():
            continue
        if body[0] != " ":  # a new report (or a summary)
            if body.startswith(_NOT_REPORTS):
                continue
            out.append([body.rstrip()])
        elif out:
            out[-1].append(body.strip())
    return ["\n".join(r) for r in out]


def summarize(text: str, exit_status: int | None = None) -> dict:
    found = reports(text)
    ours = [r for r in found if _OURS.search(r)]
    app_failed = [r for r in found if r.startswith("Target application returned an error")]
    errors = [int(m.group(1)) for m in _SUMMARY.finditer(text)]
    race = _RACE_SUMMARY.search(text)
    finished = bool(errors) or race is not None
    total = errors[-1] if errors else (int(race.group(2)) if race else None)
    if not finished:
        verdict = "incomplete"
    elif total or ours:
        verdict = "errors"
    elif app_failed:
        verdict = "script failed"
    else:
        verdict = "clean"
    return {
        "verdict": verdict,
        "finished": finished,
        "errors": total,
        "race_hazards": int(race.group(1)) if race else None,
        "race_warnings": int(race.group(3)) if race else None,
        "reports": len(found) - len(app_failed),
        "fastelbo_reports": len(ours),
        "other_reports": len(found) - len(ours) - len(app_failed),
        "exit_status": exit_status,
        "first_fastelbo": ours[:3],
        "first_other": [r for r in found if r not in ours and r not in app_failed][:3],
    }
