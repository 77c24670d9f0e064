"""Turn pytest-benchmark JSON files from `benchmarks/` into a markdown report and PNG plots.

  python -m benchmarks.report benchmarks/results/<file>.json [more.json ...] [--out DIR]
  python -m benchmarks.report <gpu_check.json> --readme     # print the README's results table from a GPU check
  python -m benchmarks.report <gpu_check.json> --routing-table [PATH]   # crossflow_kernels.attention's SDPA routing table
  python -m benchmarks.report sweep_digits-sr.json ...   # `crossflow eval --sweep-steps` results: tables and curves

A GPU-check result (`benchmarks/gpu_session/gpu_check.py`, schema `crossflow-gpu-check/1`) may be given among the files:
it gets its own section (`gpu_check_section`); `readme_table` renders the README's results table from it alone;
`routing_table` derives from its attention stage the per-device table `crossflow_kernels.attention` routes by (written
to crossflow_kernels/routes/attention-routes_<device>.json, package data, unless PATH, a file or a directory, says
otherwise).

Writes DIR/report.md (default: benchmarks/results/report/) and one PNG per (op, mode, dtype) and per sampler preset.
Every number comes from the `extra_info` the suites recorded; each section's caption names its source JSON file.
Kernel rows: p50 (p20–p80) ms, GB/s or TFLOP/s, fraction of the limit measured in that run, and speed-up versus the
best baseline of the same case (fastest non-`triton` provider). Sampler rows: images/s, latency, speed-up versus
`official_eager`, MFU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "report"


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:,.0f}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]


def _plot_bars(path: Path, title: str, groups: list[str], series: dict[str, list[float | None]], ylabel: str,
               limit: float | None = None) -> str:
    """Grouped bars; returns the markdown image line ("" without matplotlib: the tables do not need it)."""
    try:
        import matplotlib
    except ImportError:
        return ""

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(series)) / 3), 4))
    width = 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series.items()):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [v or 0.0 for v in vals], width, label=name)
    if limit:
        ax.axhline(limit, color="k", linestyle="--", linewidth=1, label="measured limit")
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, rotation=20)
    ax.set(title=title, ylabel=ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"![{title}]({path.name})"


def _kernel_section(src: str, stem: str, cases: list[dict], out: Path) -> list[str]:
    lines: list[str] = []
    by_op: dict[str, list[dict]] = defaultdict(list)
    for e in cases:
        by_op[e["op"]].append(e)
    for op, rows in by_op.items():
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for e in rows:
            groups[(e["shape_id"], e["dtype"], e["mode"])].append(e)
        table = []
        for key in sorted(groups):
            base = [e for e in groups[key] if e["provider"] != "triton"]
            best = min(base, key=lambda e: e["ms_p50"]) if base else None
            for e in sorted(groups[key], key=lambda e: e["provider"]):
                rate = e.get("gbps", e.get("tflops"))
                table.append([
                    f"{key[0]} {tuple(e['shape'])}", key[1], key[2], e["provider"], e["ms_p50"],
                    f"{_fmt(e['ms_p20'])}–{_fmt(e['ms_p80'])}", rate, e.get("frac_of_limit"),
                    f"{_fmt(best['ms_p50'] / e['ms_p50'])}×" if best else "–",
                    best["provider"] if best and e["provider"] == "triton" else "",
                ])
        unit = "GB/s" if "gbps" in rows[0] else "TFLOP/s"
        lines += [f"### {op}", "", f"Source: `{src}`; timer: {rows[0].get('timer')}; {unit} per the formulas in "
                  "`bench_kernels.py`; fraction of the limit measured in the same run.", ""]
        lines += _table(["shape", "dtype", "mode", "provider", "p50 ms", "p20–p80 ms", unit, "frac of limit",
                         "vs best baseline", "best baseline"], table)
        lines.append("")
        for (mode, dtype) in sorted({(e["mode"], e["dtype"]) for e in rows}):
            sel = [e for e in rows if e["mode"] == mode and e["dtype"] == dtype]
            shapes = sorted({e["shape_id"] for e in sel})
            provs = sorted({e["provider"] for e in sel})
            val = {(e["shape_id"], e["provider"]): e.get("gbps", e.get("tflops")) for e in sel}
            png = out / f"{stem}_{op}_{mode}_{dtype}.png"
            lines += [_plot_bars(png, f"{op} {mode} {dtype} ({src})", shapes,
                                 {p: [val.get((s, p)) for s in shapes] for p in provs}, unit, sel[0].get("limit")), ""]
    return lines


def _sampler_section(src: str, stem: str, cases: list[dict], out: Path) -> list[str]:
    ref = {(e["preset"], e["batch"]): e["latency_s"] for e in cases if e["provider"] == "official_eager"}
    rows = []
    for e in sorted(cases, key=lambda e: (e["preset"], e["batch"], e["provider"])):
        base = ref.get((e["preset"], e["batch"]))
        rows.append([e["preset"], e["batch"], e["steps"], e["provider"], e["backend"], e["images_per_s"],
                     e["latency_s"], e["s_per_image"], f"{_fmt(base / e['latency_s'])}×" if base else "–",
                     e.get("mfu"), e.get("warmup_s"), e.get("peak_mem_gb")])
    lines = ["### Sampler", "", f"Source: `{src}`; guidance {cases[0]['guidance_scale']}, {cases[0]['dtype']}, "
             "random weights; latency = one sampler call for the whole batch; MFU against the matmul TFLOP/s "
             "(bf16 on a GPU) measured in the same run.", ""]
    lines += _table(["preset", "batch", "steps", "provider", "backend", "images/s", "latency s", "s/image",
                     "vs official_eager", "MFU", "warm-up s", "peak GB"], rows)
    lines.append("")
    for preset in sorted({e["preset"] for e in cases}):
        sel = [e for e in cases if e["preset"] == preset]
        batches = sorted({e["batch"] for e in sel})
        val = {(e["batch"], e["provider"]): e["images_per_s"] for e in sel}
        provs = sorted({e["provider"] for e in sel})
        png = out / f"{stem}_sampler_{re.sub(r'[^A-Za-z0-9]+', '-', preset)}.png"
        lines += [_plot_bars(png, f"sampler {preset} ({src})", [f"B={b}" for b in batches],
                             {p: [val.get((b, p)) for b in batches] for p in provs}, "images/s"), ""]
    return lines


def _status_line(data: dict) -> str:
    st = data.get("stages", {})
    return "; ".join(f"{n} {s.get('status')} ({_fmt(s.get('wall_s'))} of {_fmt(s.get('budget_s'))} s)"
                     for n, s in st.items())


def _ok(cases: list[dict]) -> list[dict]:
    return [c for c in cases if c.get("status") == "ok"]


GPU_CHECK_SCHEMA = "crossflow-gpu-check/1"


def read_gpu_check(path: Path) -> dict[str, Any]:
    """A GPU-check result (`benchmarks/gpu_session/gpu_check.py` writes it); ValueError for any other JSON."""
    data = json.loads(Path(path).read_text())
    if data.get("schema") != GPU_CHECK_SCHEMA:
        raise ValueError(f"{path}: not a GPU-check result (schema {data.get('schema')!r}, "
                         f"expected {GPU_CHECK_SCHEMA!r})")
    return data


def attention_summary(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (shape, mode): ours vs the fastest SDPA backend that ran in the same run (None when either is missing)."""
    groups: dict[tuple, list[dict]] = {}
    for c in cases:
        groups.setdefault((tuple(c["shape"]), c.get("layout", "bhtd"), c["mode"], c["dtype"]), []).append(c)
    rows = []
    for (shape, layout, mode, dtype), cs in groups.items():
        ok = [c for c in cs if c.get("status") == "ok"]
        ours = next((c for c in ok if c["provider"] == "triton"), None)
        sdpa = [c for c in ok if c["provider"].startswith("sdpa_")]
        best = max(sdpa, key=lambda c: c["tflops"]) if sdpa else None
        rows.append(dict(
            shape=list(shape), layout=layout, model=cs[0]["model"], batch=cs[0]["batch"], mode=mode, dtype=dtype,
            ours_tflops=ours["tflops"] if ours else None, best_sdpa=best["provider"] if best else None,
            best_sdpa_tflops=best["tflops"] if best else None,
            frac_of_best_sdpa=ours["tflops"] / best["tflops"] if ours and best else None,
            sdpa_ran=sorted(c["provider"] for c in sdpa),
        ))
    return rows


ROUTE_MARGIN = 1.05  # SDPA must be this much faster than ours on a bucket to take it: p50 timings move a few percent


def routing_table(data: dict[str, Any], src: str, margin: float = ROUTE_MARGIN) -> dict[str, Any]:
    """`crossflow_kernels.attention`'s routing table (schema `crossflow_kernels.attention_routes.SCHEMA`) from one
    GPU-check result.

    The attention stage's cases are grouped by routing bucket (`crossflow_kernels.attention_routes.bucket`: head dim,
    Tq/Tk and B·H power-of-two ceilings, dtype, mask, fwd vs fwd+bwd). Per bucket, each provider's p50 ms are summed
    over the bucket's measured shapes (a provider counts only if it ran on all of them); the fastest SDPA backend takes
    the bucket when ours takes at least `margin` times as long. Every bucket where ours ran gets an entry (backend
    "triton" where ours stays), so the table also says where ours was measured to win. Buckets where ours failed get
    no entry (ours runs there anyway, and routing must not hide a failure of ours): they are listed in `skipped`."""
    from crossflow_kernels.attention_routes import KEY_FIELDS, OURS, SCHEMA, SDPA_BACKENDS, bucket

    if not margin >= 1.0:
        raise ValueError(f"routing margin must be >= 1 (SDPA at least as fast as ours), got {margin}")
    env = data.get("env", {})
    if not env.get("device_name"):
        raise ValueError(f"{src}: no env.device_name: cannot tell which device the table is for")
    # Cases of the model's own layout (the fused qkv views the routed calls get) decide a bucket where ours ran in it;
    # contiguous ones otherwise (and older results, whose cases name no layout).
    by_layout: dict[tuple, dict[str, dict[tuple, list[dict]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(
        list)))
    for c in data.get("stages", {}).get("attention", {}).get("cases", []):
        b, h, t, d = c["shape"]
        key = bucket(d, t, t, b * h, c["dtype"], bool(c.get("mask", False)), c["mode"])
        by_layout[key][c.get("layout", "bhtd")][tuple(c["shape"])].append(c)
    groups, layouts = {}, {}
    for key, lays in by_layout.items():
        ours_in = [lay for lay in ("qkv", "bhtd") if any(c["provider"] == OURS for cs in lays.get(lay, {}).values()
                                                         for c in cs)]
        layouts[key] = (ours_in or sorted(lays))[0]
        groups[key] = lays[layouts[key]]
    entries, skipped = [], []
    for key in sorted(groups):
        shapes = groups[key]
        totals: dict[str, float] = {}
        for prov in {c["provider"] for cs in shapes.values() for c in cs}:
            ms = [next((c.get("ms_p50") for c in cs if c["provider"] == prov and c.get("status") == "ok"), None)
                  for cs in shapes.values()]
            if all(m is not None for m in ms):
                totals[prov] = sum(ms)
        where = dict(zip(KEY_FIELDS, key))
        if OURS not in totals:
            skipped.append({**where, "reason": "ours did not run ok on every measured shape of the bucket",
                            "shapes": sorted(list(s) for s in shapes)})
            continue
        sdpa = {p: ms for p, ms in totals.items() if p in SDPA_BACKENDS}
        best = min(sdpa, key=sdpa.get) if sdpa else None
        take = best is not None and totals[OURS] >= margin * sdpa[best]
        entries.append({
            **where, "backend": best if take else OURS, "ours_ms": round(totals[OURS], 6),
            "best_sdpa": best, "sdpa_ms": round(sdpa[best], 6) if best else None,
            "speedup": round(totals[OURS] / sdpa[best], 4) if best else None,
            "ms": {p: round(v, 6) for p, v in sorted(totals.items())}, "shapes": sorted(list(s) for s in shapes),
            "layout": layouts[key],
        })
    return {
        "schema": SCHEMA, "device_name": env["device_name"], "smoke": bool(data.get("smoke")),
        "source": {"file": src, "started": data.get("started"), "commit": env.get("commit"),
                   **{k: env.get(k) for k in ("torch", "triton", "cuda", "cudnn", "capability")}},
        "margin": margin,
        "rule": "per bucket: sum of p50 ms over its measured shapes; the fastest SDPA backend replaces ours when "
                "ours_ms >= margin * sdpa_ms",
        "entries": entries, "skipped": skipped,
    }


def write_routing_table(data: dict[str, Any], src: str, dest: str | Path | None = None,
                        margin: float = ROUTE_MARGIN) -> Path:
    """Write `routing_table(data)` to `dest` (a file, or a directory for its default name; default: the committed
    place, the package data directory crossflow_kernels/routes/) atomically, then read it back through the loader
    `crossflow_kernels.attention` uses."""
    from crossflow_kernels.attention_routes import DEFAULT_DIR, parse_table, table_file_name

    table = routing_table(data, src, margin)
    if dest is None:
        if table["smoke"]:
            raise ValueError(f"{src} is a CPU smoke run: its routing table is no measurement and does not go to "
                             f"{DEFAULT_DIR}; give a path")
        dest = DEFAULT_DIR
    dest = Path(dest)
    path = dest / table_file_name(table["device_name"]) if dest.is_dir() else dest
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, path)
    parse_table(path, path.read_bytes())
    return path


def readme_table(data: dict, src: str) -> list[str]:
    """The README's results table, from one GPU-check JSON: attention vs the best SDPA backend per shape, adaLN vs
    torch.compile, sampler images/s. Every number is read from `data`; nothing is filled in where a case is missing."""

    env, stages = data.get("env", {}), data.get("stages", {})
    lines = [f"Source: `{src}` ({env.get('device_name', '?')}; torch {env.get('torch', '?')}, triton "
             f"{env.get('triton', '?')}, CUDA {env.get('cuda', '?')}, cuDNN {env.get('cudnn', '?')}; commit "
             f"{str(env.get('commit') or '?')[:12]}; run {data.get('started', '?')}). "
             f"Stages: {_status_line(data)}.", ""]
    if data.get("smoke"):
        lines += ["**CPU smoke run: these numbers check the GPU-check code; they are not performance results.**", ""]
    lim = stages.get("limits", {}).get("results", {})
    if lim:
        lines += [f"Measured limits: copy {_fmt(lim.get('copy_gbps'))} GB/s (read + write), "
                  f"{lim.get('dtype')} matmul {_fmt(lim.get('matmul_tflops'))} TFLOP/s "
                  f"({'x'.join(map(str, lim.get('matmul_shape', [])))}).", ""]
    tests = stages.get("tests", {}).get("results", {})
    if tests:
        lines += [f"GPU tests (`pytest -m gpu`): {tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, "
                  f"{tests.get('errors', 0)} errors, {tests.get('skipped', 0)} skipped.", ""]
    attn = [c for c in stages.get("attention", {}).get("cases", []) if c.get("layout", "bhtd") == "bhtd"]
    if attn:
        rows = [[r["model"], r["batch"], "x".join(map(str, r["shape"])), r["mode"], r["ours_tflops"],
                 (r["best_sdpa"] or "–").removeprefix("sdpa_"), r["best_sdpa_tflops"], r["frac_of_best_sdpa"]]
                for r in sorted(attention_summary(attn), key=lambda r: (r["mode"] != "fwd", r["shape"][3],
                                                                        r["shape"][2], r["batch"]))]
        lines += [f"Attention, {attn[0]['dtype']}, TFLOP/s (fwd 4·B·H·T²·D, fwd+bwd 3.5×); best SDPA = the fastest "
                  "backend that ran on that shape in this run:", ""]
        lines += _table(["model", "batch", "2B×H×T×D", "mode", "ours", "best SDPA", "its TFLOP/s",
                         "ours / best"], rows) + [""]
    norm = _ok(stages.get("adaln", {}).get("cases", []))
    if norm:
        by = defaultdict(dict)
        for c in norm:
            by[(c["op"], c["shape_id"], "x".join(map(str, c["shape"])), c["mode"])][c["provider"]] = c["gbps"]
        rows = []
        for key in sorted(by):
            v = by[key]
            ratio = v["triton"] / v["torch_compile"] if "triton" in v and "torch_compile" in v else None
            rows.append([*key, v.get("triton"), v.get("torch_compile"), v.get("torch"), ratio])
        lines += [f"adaLN, {norm[0]['dtype']}, GB/s of the bytes a fused kernel must move "
                  f"(copy limit {_fmt(lim.get('copy_gbps'))} GB/s):", ""]
        lines += _table(["op", "shape id", "shape", "mode", "ours", "torch.compile", "eager", "ours / compile"],
                        rows) + [""]
    samp = stages.get("sampler", {})
    sc = _ok(samp.get("cases", []))
    if sc:
        provs = ["official_eager", "batched_eager", "fast", "compile_default"]
        by = defaultdict(dict)
        for c in sc:
            by[c["batch"]][c["provider"]] = c["images_per_s"]
        rows = [[b, *[by[b].get(p) for p in provs],
                 by[b]["fast"] / by[b]["official_eager"] if "fast" in by[b] and "official_eager" in by[b] else None]
                for b in sorted(by)]
        r = samp.get("results", {})
        lines += [f"Sampler {r.get('preset')}, {r.get('steps')} steps, guidance {r.get('guidance_scale')}, "
                  f"{r.get('dtype')}, random weights, images/s (median of {r.get('rounds')} timed runs):", ""]
        lines += _table(["batch", "official eager", "batched eager", "FastSampler", "torch.compile", "Fast / official"],
                        rows) + [""]
    return lines


def gpu_check_section(path: Path, data: dict) -> list[str]:
    """A GPU-check JSON's section of the report: the README table, then every case and what did not run."""
    lines = [f"## {path.name}", ""] + readme_table(data, path.name)
    for name, st in data.get("stages", {}).items():
        if st.get("status") != "ok":
            lines += [f"- stage `{name}`: {st.get('status')}: {st.get('error') or st.get('note') or ''}".rstrip(": ")]
        for c in st.get("cases", []):
            if c.get("status") != "ok":
                what = " ".join(str(c.get(k)) for k in ("op", "model", "preset", "shape", "mode", "batch", "provider")
                                if c.get(k) is not None)
                lines += [f"- {name} {what}: {c.get('status')}: {c.get('reason', '')}"]
    tests = data.get("stages", {}).get("tests", {}).get("results", {})
    for f in tests.get("failures", []):
        lines += [f"- test {f['test']}: {f['kind']}: {f['message'].splitlines()[0] if f['message'] else ''}"]
    for s in tests.get("skipped_reasons", []):
        lines += [f"- skipped tests ({s['count']}, e.g. {s['example']}): {s['reason']}"]
    ncu = data.get("stages", {}).get("ncu", {}).get("results", {})
    if ncu.get("metrics"):
        lines += ["", f"ncu on one attention forward {ncu.get('shape')} {ncu.get('dtype')} (`{ncu.get('report')}`):",
                  ""] + _table(["metric", "value"], [[k, v] for k, v in ncu["metrics"].items()])
    return lines + [""]


# The number each preset's sweep plots beside the distance to the converged solution (`crossflow eval --sweep-steps`)
SWEEP_METRIC = {"digits": "diversity", "digits-sr": "realism", "digits-caption": "accuracy",
                "digits-vary": "label_kept"}


def _plot_sweep(path: Path, data: dict[str, Any]) -> str:
    """Distance to the converged solution and the preset's metric against NFE, one line per sampler."""
    try:
        import matplotlib
    except ImportError:
        return ""

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = SWEEP_METRIC.get(data["preset"])
    fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(10 if metric else 5, 3.6), squeeze=False)
    by: dict[str, list[dict]] = defaultdict(list)
    for pt in data["points"]:
        by[pt["sampler"]].append(pt)
    for name, pts in by.items():
        pts = sorted(pts, key=lambda q: q["nfe"])
        nfe = [q["nfe"] for q in pts]
        axes[0][0].loglog(nfe, [max(q["rmse_to_converged"], 1e-6) for q in pts], "o-", label=name)
        if metric:
            axes[0][1].semilogx(nfe, [q.get(metric) for q in pts], "o-", label=name)
    b = data.get("baseline") or (data.get("recommended") or {}).get("baseline") or {}
    base = next((q for q in data["points"] if (q["sampler"], q["steps"]) == (b.get("sampler"), b.get("steps"))), None)
    if base is not None:
        axes[0][0].axhline(base["rmse_to_converged"], color="grey", ls=":",
                           label=f"baseline {base['sampler']} x {base['steps']}")
    axes[0][0].set(xlabel="network evaluations (NFE)", ylabel="RMSE to the converged solution",
                   title=f"{data['preset']}: solver error")
    axes[0][0].legend(fontsize=8)
    if metric:
        ref = data["reference"]
        j = ref.get("judged", {}).get(metric)
        if j is not None:  # the edge of "within noise" of the converged solution
            sign = {"higher": -1, "lower": 1}.get(j["better"], 0)
            axes[0][1].axhline(j["value"] + sign * ref["noise_k"] * j["std"], color="grey", ls=":",
                               label=f"converged {'-' if sign < 0 else '+'} {ref['noise_k']:g} std (seed noise)")
        recs = [q for q in (data.get("per_sampler") or {"": data.get("recommended")}).values() if q is not None]
        for i, r in enumerate(recs):  # the cheapest point within noise, of each sampler
            pt = next(q for q in data["points"] if (q["sampler"], q["steps"]) == (r["sampler"], r["steps"]))
            axes[0][1].plot([pt["nfe"]], [pt[metric]], "k*", ms=12, mfc="none",
                            label="cheapest within noise" + (", per sampler" if data.get("per_sampler") else "")
                            if i == 0 else None)
        axes[0][1].legend(fontsize=8)
        axes[0][1].set(xlabel="network evaluations (NFE)", ylabel=metric, title=f"{data['preset']}: {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"![{data['preset']} sweep]({path.name})"


def sweep_section(path: Path, data: dict[str, Any], out: Path) -> list[str]:
    """A quality-against-NFE sweep: its recommendation, the reference's noise, a table of every point and the plot."""
    r, ref = data["recommended"], data["reference"]
    metric = SWEEP_METRIC.get(data["preset"])
    if r is None:
        rec = "Recommended: none (no point passes the bars within noise of the reference)."
    else:
        b = r["baseline"]
        rec = (f"Recommended: **{r['sampler']} x {r['steps']} steps = {r['nfe']} NFE** against the baseline "
               f"{b['sampler']} x {b['steps']} = {b['nfe']} NFE ({'' if b['within_noise'] else 'not '}within noise): "
               f"{r['saving']:.1f}x fewer evaluations.")
    judged = ref.get("judged", {})
    lines = [f"## {path.name}: {data['preset']}, quality against network evaluations", "",
             f"Source: `{path.name}` (`crossflow eval --preset {data['preset']} --sweep-steps ...`). Reference: "
             f"{ref['sampler']} x {ref['steps']} steps" + (f" at {ref['seeds']} seeds; within noise = no judged number "
             f"worse than the reference's by more than {ref['noise_k']:g} standard deviations over those seeds ("
             + ", ".join(f"{k} {j['value']:.4g} +- {j['std']:.2g}, {j['better']} is better" for k, j in judged.items())
             + ")" if judged else "") + f". {rec}", ""]
    if data.get("per_sampler"):
        lines += ["Per sampler: " + "; ".join(
            f"{name}: " + ("none within noise" if q is None else f"{q['steps']} steps = {q['nfe']} NFE, "
                           f"{q['saving']:.1f}x") for name, q in data["per_sampler"].items()) + ".", ""]
    rows = [[p["sampler"], p["steps"], p["nfe"], p["rmse_to_converged"], p.get(metric) if metric else None,
             "yes" if p["passed"] else "no", ", ".join(p.get("worse", [])) or "-"]
            for p in sorted(data["points"], key=lambda q: (q["sampler"], q["nfe"]))]
    lines += _table(["sampler", "steps", "NFE", "RMSE to converged", metric or "-", "passes the bars",
                     "worse than the reference"], rows)
    img = _plot_sweep(out / f"{path.stem}.png", data)
    return lines + (["", img] if img else []) + [""]


def _file_section(path: Path, out: Path) -> list[str]:
    data = json.loads(path.read_text())
    if str(data.get("schema", "")).startswith("crossflow-gpu-check/"):
        return gpu_check_section(path, data)
    if {"points", "recommended", "reference"} <= set(data):
        return sweep_section(path, data, out)
    meta = data.get("crossflow_bench", {})
    src, stem = path.name, path.stem
    infos = [b["extra_info"] for b in data.get("benchmarks", []) if b.get("extra_info")]
    dev = next((e for e in infos if e.get("device_name")), meta)
    commit = data.get("commit_info") or {}
    lines = [f"## {src}", "", f"Device: {dev.get('device_name', '?')}; torch {dev.get('torch', '?')}; "
             f"triton {dev.get('triton', '?')}; run {data.get('datetime', '?')}; commit "
             f"{str(commit.get('id') or '?')[:12]} (dirty: {commit.get('dirty', '?')}).", ""]
    if meta.get("tiny") or any(e.get("tiny") for e in infos):
        lines += ["**CPU/tiny smoke run: these numbers check the benchmark code; they are not performance results.**",
                  ""]
    limits = [e for e in infos if e.get("kind") == "device_limits"]
    if limits:
        e = limits[0]
        lines += ["### Device limits", "", f"Source: `{src}`.", ""]
        lines += _table(["copy GB/s", "matmul TFLOP/s", "dtype", "matmul shape", "timer", "note"],
                        [[e["copy_gbps"], e["matmul_tflops"], e["dtype"], "×".join(map(str, e["matmul_shape"])),
                          e["timer"], e.get("note") or ""]]) + [""]
    kernels = [e for e in infos if e.get("kind") == "kernel"]
    if kernels:
        lines += _kernel_section(src, stem, kernels, out)
    samplers = [e for e in infos if e.get("kind") == "sampler"]
    if samplers:
        lines += _sampler_section(src, stem, samplers, out)
    skipped = meta.get("skipped", [])
    if skipped:
        reasons: dict[str, list[str]] = defaultdict(list)
        for s in skipped:
            reasons[s["reason"]].append(s["case"].split("::")[-1])
        lines += ["### Skipped cases", "", f"Source: `{src}`.", ""]
        lines += _table(["reason", "cases", "example"], [[r, len(c), c[0]] for r, c in sorted(reasons.items())])
        lines.append("")
    return lines


def write_report(paths: list[str | Path], out: str | Path = DEFAULT_OUT) -> Path:
    """Render every JSON into one markdown file (sections in the given order) plus PNGs; returns the .md path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Benchmark report", "", "Generated by `python -m benchmarks.report` from: "
             + ", ".join(f"`{Path(p).name}`" for p in paths) + ".", ""]
    for p in paths:
        lines += _file_section(Path(p), out)
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Markdown tables + PNG plots from benchmark JSON files.")
    p.add_argument("json", nargs="+", help="pytest-benchmark JSON files written by `pytest benchmarks ...`")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (report.md + PNGs)")
    p.add_argument("--print", action="store_true", help="also print the markdown")
    p.add_argument("--readme", action="store_true", help="print only the README results table of one GPU-check JSON")
    p.add_argument("--routing-table", nargs="?", const="", default=None, metavar="PATH",
                   help="write crossflow_kernels.attention's SDPA routing table from one GPU-check JSON (to PATH, a file or a "
                        "directory; default crossflow_kernels/routes/attention-routes_<device>.json)")
    p.add_argument("--margin", type=float, default=ROUTE_MARGIN,
                   help=f"with --routing-table: SDPA takes a bucket when ours takes >= this times as long "
                        f"(default {ROUTE_MARGIN})")
    args = p.parse_args(argv)
    if args.routing_table is not None:
        if len(args.json) != 1:
            p.error("--routing-table takes exactly one GPU-check JSON")
        try:
            data = read_gpu_check(Path(args.json[0]))
            path = write_routing_table(data, Path(args.json[0]).name, args.routing_table or None, args.margin)
        except (OSError, ValueError, KeyError) as e:
            p.error(f"{args.json[0]}: {type(e).__name__}: {e}" if isinstance(e, KeyError) else str(e))
        n = sum(e["backend"] != "triton" for e in json.loads(path.read_text())["entries"])
        print(f"wrote {path} ({n} routed buckets)")
        return
    if args.readme:
        if len(args.json) != 1:
            p.error("--readme takes exactly one GPU-check JSON")
        try:
            data = read_gpu_check(Path(args.json[0]))
        except (OSError, ValueError) as e:
            p.error(str(e))
        print("\n".join(readme_table(data, Path(args.json[0]).name)))
        return
    md = write_report(args.json, args.out)
    if args.print:
        print(md.read_text())
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
