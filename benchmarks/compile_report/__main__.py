"""`python -m benchmarks.compile_report`: see `benchmarks/compile_report/report.py`."""
import sys

from benchmarks.compile_report.report import main

sys.exit(main())
