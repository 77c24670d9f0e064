"""The device's practical limits, measured in the same run as the other suites (see `_common.measure_limits`).

The `device_limits` case records copy GB/s and bf16 matmul TFLOP/s in its `extra_info`; every kernel and sampler case
divides by the same session-scoped numbers (`frac_of_limit`, `mfu`) and records the limit it used.
"""

from __future__ import annotations

import torch

from benchmarks._common import synced


def test_device_limits(benchmark, bench, device_limits):
    n = 1 << 22
    src = torch.randn(n, device=bench.device)
    dst = torch.empty_like(src)
    benchmark.group = "device_limits"
    benchmark.extra_info.update(kind="device_limits", provider="device", tiny=bench.tiny, **device_limits)
    # The timed body is a small copy: the limits themselves come from do_bench inside the fixture.
    benchmark.pedantic(synced(lambda: dst.copy_(src)), rounds=1 if bench.tiny else 5, iterations=1)
