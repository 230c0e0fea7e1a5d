"""The GPU check: one prepared command for a machine with an NVIDIA GPU.

    bash bench/gpu_check.sh OUT_DIR              run every stage (about 8 minutes at most)
    bash bench/gpu_check.sh OUT_DIR --dry-run    print the stages, their commands and time caps

It installs fastelbo from the checkout without the network, builds the C++
and CUDA kernels with every core, runs the test suite on CUDA tensors for the
`cuda` and `triton` backends, compute-sanitizer (memcheck, racecheck,
synccheck) over every CUDA kernel, and `fastelbo bench`'s cases on the GPU;
each stage in its own process group under a time cap, the report (JSON and
markdown) rewritten after every stage so a hang or a timeout keeps what the
other stages found.

Modules (each one thing):
  stages.py         the plan: every stage's command, cap and environment
  runner.py         runs the plan: process groups, caps, logs, the report after every stage
  report.py         report.json and report.md from the stages' outputs (standard library only)
  winners.py        which fastelbo backend is faster on CUDA, per op family and shape class
  install.py        stage: a virtual environment over the machine's Python, fastelbo installed into it
  versions.py       stage: what the machine has (Python, torch, CUDA, Triton, the GPU, the tools)
  build_ext.py      stage: the C++ and CUDA extensions, built at once with every core
  select_tests.py   pytest plugin of the test stage: the CUDA cases, shards, one result line per test
  sanitize_ops.py   stage script: every CUDA kernel launched forward and backward (run under compute-sanitizer)
  sanitizer_log.py  the verdict of a compute-sanitizer log
  bench_gpu.py      stage: the benchmark cases on the GPU, priority first, saved after every case
"""
