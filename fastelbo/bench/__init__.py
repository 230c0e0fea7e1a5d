"""Benchmark machinery shared by the pytest-benchmark suite (bench/) and the
``fastelbo bench`` command: what runs (cases), how it is measured (measure),
the sweep, its table/baseline/compare (report) and the PNG plot (plot).

    from fastelbo.bench import cases, sweep, report
    doc = sweep.run_sweep(cases.cases(ops=["step"], shapes=[cases.TARGET]))
    print(report.format_table(doc))
"""

from . import cases, measure, plot, report, sweep

__all__ = ["cases", "measure", "plot", "report", "sweep"]
