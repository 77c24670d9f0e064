"""The attention tuning module (crossflow_kernels/attention_tuning.py): provenance of its measured tables.

Every measured spill entry names the committed compile report it comes from; the report must exist and show that
spill (a spilling row of the same arch, kernel, padded head dim, mask and tile).
"""

import json
from functools import cache
from pathlib import Path

import pytest

from crossflow_kernels import attention_tuning as tuning

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
_KIND = {"_attention_fwd_kernel": "fwd", "_attention_bwd_dkdv_kernel": "dkdv", "_attention_bwd_dq_kernel": "dq",
         "_attention_bwd_fused_kernel": "fused", "_attention_fwd_sm90_kernel": "sm90"}
# Measured before compile reports were committed: the only entries allowed to cite none.
_UNRECORDED = {(80, "dkdv", 80, None, (32, 64, 8, 2))}


@cache
def _spilling_rows(name: str) -> list[tuple]:
    """(arch, kind, padded head dim, mask class (HAS_MASK, or "lens"), tile) of every attention config that spilled
    in report `name`."""
    out = []
    for r in json.loads((RESULTS / name).read_text())["rows"]:
        if r.get("error") or not r.get("spill_store_bytes") or r["kernel"] not in _KIND:
            continue
        ce, c = r["constexprs"], r["config"]
        mask = "lens" if ce.get("KEY_LENS") else ce.get("HAS_MASK")
        out.append((r["arch"], _KIND[r["kernel"]], ce["D0"] + ce["D1"], mask,
                    (c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"])))
    return out


def _entries():
    for arch, table in tuning._PTXAS_SPILLS.items():
        for (kind, d, m, tile), src in table.items():
            yield (arch, kind, d, m, tile), src
    for arch, table in tuning._SM90_SPILLS.items():
        for (d, m, tile), src in table.items():
            yield (arch, "sm90", d, m, tile), src


def test_cited_reports_exist():
    assert tuning.REPORTS
    for short, name in tuning.REPORTS.items():
        assert (RESULTS / name).is_file(), f"REPORTS[{short!r}] = {name} is not under {RESULTS}"


@pytest.mark.parametrize("entry, src", list(_entries()), ids=str)
def test_each_measured_exclusion_cites_a_report_that_shows_it(entry, src):
    if src is None:
        assert entry in _UNRECORDED, f"{entry} cites no compile report"
        return
    assert src in tuning.REPORTS, f"{entry} cites {src!r}, not a REPORTS name"
    arch, kind, d, m, tile = entry
    rows = _spilling_rows(tuning.REPORTS[src])
    assert any(r[0] == arch and r[1] == kind and (d is None or r[2] == d) and (m is None or r[3] == m)
               and r[4] == tile for r in rows), f"{tuning.REPORTS[src]} shows no spill for {entry}"


def test_the_op_module_imports_the_tuning_module_not_the_reverse():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(tuning))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "crossflow_kernels.attention" not in imported
