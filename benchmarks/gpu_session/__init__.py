"""The GPU-session harness: the one prepared command for a lent GPU machine (entry: `bash benchmarks/run_gpu.sh`).

`gpu_check.py` runs the stages with their budgets and writes the results JSON; `gpu_pytest.py` is the pytest plugin of
its tests stage. The stage bodies time the suites one folder up (`benchmarks/bench_*.py`), and `benchmarks/report.py`
reads what they write.
"""
