"""The compile report: what every Triton kernel becomes on sm_90 / sm_80 / sm_100 / sm_120, without a GPU.

    python -m benchmarks.compile_report [--quick] [--arch 90,80,100,120] [--filter attention] [--json PATH] [--jobs N]

`report.py` drives the ops, compiles every kept config and judges it; `parse.py` reads the compile artefacts (TTIR,
TTGIR, LLVM IR, PTX, the `ptxas -v` log). Results go to `benchmarks/results/<date>_compile-report_*.json`.
"""
