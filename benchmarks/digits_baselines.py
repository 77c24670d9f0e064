"""Issue 22's numbers in one JSON: the simple baselines of every digits preset, the realism of the shipped models'
outputs, and captioning on shifted digits (the shipped captioner against one trained with --augment-shift 2).

    OMP_NUM_THREADS=1 python -m benchmarks.digits_baselines                       # every part
    OMP_NUM_THREADS=1 python -m benchmarks.digits_baselines --parts baselines sr   # some parts; the others are kept
    ... --caption-new runs/caption-shift2/final   # the shift-trained captioner (trained by
        `python -m crossflow.train --preset digits-caption --augment-shift 2 --out runs/caption-shift2`)

Parts: baselines (`crossflow.digits.baselines.run_all` for the four presets), t2i / sr / vary (the shipped models:
their judges and the realism of their outputs), caption (`digits.baselines.caption_accuracy` of the shipped captioner
and of --caption-new: clean, every held-out image at every shift with max(|dy|, |dx|) = 1 and = 2). Each part writes
its numbers, the command and its wall time into --out (default benchmarks/results/digits_baselines_2026-12-06.json),
merged with what the file already holds. Models run on the torch kernels backend, on the CPU, one thread unless
OMP_NUM_THREADS says otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "digits_baselines_2026-12-06.json"
PARTS = ("baselines", "t2i", "sr", "vary", "caption")


def _clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float):
        return round(x, 6)
    if isinstance(x, Path):
        return str(x)
    return x


def part_baselines() -> dict[str, Any]:
    from crossflow.digits.baselines import PRESETS, run_all

    return {p: run_all(p) for p in PRESETS}


def part_t2i() -> dict[str, Any]:
    from crossflow.digits.eval import evaluate
    from crossflow.digits.realism import realism
    from crossflow.pipelines.base import default_checkpoint
    from crossflow.pipelines.text_to_image import CrossFlowPipeline

    pipe = CrossFlowPipeline.from_pretrained(default_checkpoint())
    kept: list[torch.Tensor] = []

    def recording(*a, **kw):
        out = pipe(*a, **kw)
        kept.append(out.float().cpu() * 2 - 1)
        return out

    res = evaluate(recording, per_prompt=10)  # the shipped sampling settings, `crossflow eval --preset digits`
    res["realism"] = realism(torch.cat(kept))
    res["checkpoint"] = "crossflow/weights/digits"
    return res


def part_sr() -> dict[str, Any]:
    from crossflow.digits.baselines import judge_upscaler
    from crossflow.pipelines.base import default_checkpoint
    from crossflow.pipelines.image import ImagePipeline

    pipe = ImagePipeline.from_pretrained(default_checkpoint("digits-sr"))
    res = judge_upscaler(lambda low: pipe.upscale(low, seed=0))
    res["checkpoint"] = "crossflow/weights/digits-sr"
    res["sampling"] = pipe.sampling
    return res


def part_vary() -> dict[str, Any]:
    from crossflow.digits.realism import realism
    from crossflow.digits.data import load_native
    from crossflow.digits.eval import evaluate_variation
    from crossflow.pipelines.base import default_checkpoint
    from crossflow.pipelines.image import ImagePipeline

    pipe = ImagePipeline.from_pretrained(default_checkpoint("digits-vary"))
    res = evaluate_variation(lambda x, n, seed: pipe.vary(x, n, seed), n=4)
    real, _ = load_native("test")
    res["realism"] = realism(pipe.vary(real, 1, seed=0))  # one variation per held-out input, in their order
    res["checkpoint"] = "crossflow/weights/digits-vary"
    res["sampling"] = pipe.sampling
    return res


def caption_model(ckpt: str) -> dict[str, Any]:
    from crossflow.digits.eval import caption_accuracy
    from crossflow.pipelines.caption import CaptionPipeline

    pipe = CaptionPipeline.from_pretrained(ckpt)  # with its sampling.json
    res = caption_accuracy(lambda images: pipe(images, 1, seed=0))
    res["checkpoint"] = ckpt
    res["sampling"] = pipe.sampling
    return res


def part_caption(new: str | None, shipped: bool = True) -> dict[str, Any]:
    from crossflow.pipelines.base import default_checkpoint

    out = {}
    if shipped:
        out["shipped"] = caption_model(default_checkpoint("digits-caption"))
        out["shipped"]["checkpoint"] = "crossflow/weights/digits-caption"
    if new is not None:
        out["augment_shift2"] = caption_model(new)
        log = Path(new).parent / "log.jsonl"  # the run's training log, when --caption-new is a run's final/
        if log.exists():
            recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            out["augment_shift2"]["training"] = {"log": str(log), "steps": recs[-1]["step"],
                                                 "final_loss": recs[-1]["loss"], "final_rec": recs[-1].get("rec")}
    return out


def summary(data: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of whatever parts `data` holds, model beside baselines (derived; nothing recomputed)."""
    out: dict[str, Any] = {}
    base = data.get("baselines", {})

    def pick(res: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
        row = {k: res[k] for k in keys if k in res}
        if "realism" in res:
            row["realism"] = res["realism"]["accuracy"]
        for k in ("shift1", "shift2"):
            if isinstance(res.get(k), dict):
                row.update({f"{k}_{m}": v for m, v in res[k].items() if m in ("psnr_db", "accuracy")})
        return row

    sr = {**({"flow (shipped)": data["sr"]} if "sr" in data else {}), **base.get("digits-sr", {})}
    out["digits-sr"] = {n: pick(r, ("psnr_db", "accuracy", "psnr_bicubic_db")) for n, r in sr.items() if n[0] != "_"}
    vary = {**({"flow (shipped)": data["vary"]} if "vary" in data else {}), **base.get("digits-vary", {})}
    out["digits-vary"] = {n: pick(r, ("label_kept", "distance_to_input")) for n, r in vary.items() if n[0] != "_"}
    t2i = {**({"flow (shipped)": data["t2i"]} if "t2i" in data else {}), **base.get("digits", {})}
    out["digits"] = {n: pick(r, ("accuracy", "diversity", "speckle")) for n, r in t2i.items() if n[0] != "_"}
    cap = {**{f"captioner ({n})": r for n, r in data.get("caption", {}).items() if n[0] != "_"},
           **base.get("digits-caption", {})}
    out["digits-caption"] = {n: pick(r, ("clean", "shift1", "shift2")) for n, r in cap.items() if n[0] != "_"}
    return {k: v for k, v in out.items() if v}


def main(argv: list[str] | None = None) -> None:
    import crossflow_kernels

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--caption-new", default=None, help="the shift-trained captioner's final/ directory")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-shipped-captioner", dest="shipped", action="store_false",
                   help="caption part: keep the shipped captioner's numbers already in --out (only --caption-new runs)")
    args = p.parse_args(argv)
    import sklearn

    for part in args.parts:
        t0 = time.perf_counter()
        with crossflow_kernels.use_backend("torch"):
            res = part_caption(args.caption_new, args.shipped) if part == "caption" else globals()[f"part_{part}"]()
        command = "python -m benchmarks.digits_baselines " + " ".join(sys.argv[1:] if argv is None else argv)
        if part == "caption":  # the models' entries merge: each carries its own command and wall time
            res = {k: {**v, "_run_wall_s": round(time.perf_counter() - t0, 1),
                          "_command": command} for k, v in res.items()}
        data = json.loads(args.out.read_text()) if args.out.exists() else {}  # what other runs wrote meanwhile
        if part == "caption":
            res = {**data.get(part, {}), **res}
        data[part] = _clean({**res, "_run": {
            "command": command,
            "wall_s": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
            "sklearn": sklearn.__version__, "machine": platform.machine()}})
        data["summary"] = _clean(summary(data))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"[digits_baselines] {part}: {data[part]['_run']['wall_s']} s -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
