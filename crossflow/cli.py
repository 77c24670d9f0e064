"""The `crossflow` command: sample, interpolate, train, eval.

    crossflow sample "a handwritten seven" -o seven.png          # the shipped text-to-digit model, on the CPU too
    crossflow interpolate "a handwritten one" "a handwritten seven" -o strip.png
    crossflow train --preset digits                               # reproduces the shipped weights (runs/digits)
    crossflow eval --preset digits                                # prompt accuracy and diversity of the shipped model
    crossflow convert t2i_512px_t5_dit.pth --preset dit-h-2-512 -o ckpt/   # an official checkpoint -> ours
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

def _device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"crossflow: error: --device {name} requested but CUDA is not available")
    return name


def _backend(name: str):
    import kernels

    if name not in kernels.BACKENDS:
        raise SystemExit(f"crossflow: error: --backend must be one of {kernels.BACKENDS}, got {name!r}")
    return kernels.use_backend(name) if name != "auto" else nullcontext()


def _checkpoint(path: str | None) -> str:
    from crossflow.pipeline import default_checkpoint

    path = path or default_checkpoint()
    if not (Path(path) / "model.safetensors").is_file():
        raise SystemExit(f"crossflow: error: no checkpoint at {path} (expected model.safetensors and config.json)")
    return path


def _pipeline(args):
    from crossflow.fast_sampler import FastSampler
    from crossflow.pipeline import CrossFlowPipeline, sampling_defaults

    ckpt = _checkpoint(args.checkpoint)
    return CrossFlowPipeline.from_pretrained(ckpt, device=_device(args.device),
                                             sampler=FastSampler(**sampling_defaults(ckpt)))


def _save_grid(images: list, rows: int, out: str, upscale: int) -> None:
    """Tile PIL images into a rows x cols grid (row-major), nearest-neighbour upscaled, written atomically."""
    from PIL import Image

    from crossflow.checkpoint import atomic_write

    cols = -(-len(images) // rows)
    w, h = images[0].size
    grid = Image.new(images[0].mode, (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    if upscale > 1:
        grid = grid.resize((grid.width * upscale, grid.height * upscale), Image.NEAREST)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: grid.save(p, format="PNG"))


def cmd_sample(args) -> None:
    with _backend(args.backend):
        pipe = _pipeline(args)
        images = pipe(args.prompts, num_images_per_prompt=args.n, steps=args.steps, guidance_scale=args.guidance,
                      seed=args.seed)
    _save_grid(images, rows=len(args.prompts), out=args.output, upscale=args.upscale)
    print(f"wrote {args.output} ({len(args.prompts)} prompt(s) x {args.n})")


def cmd_interpolate(args) -> None:
    import torch

    from crossflow.pipeline import to_pil
    from crossflow.sampling import interpolate_latents

    with _backend(args.backend):
        pipe = _pipeline(args)
        z = [pipe.encode_prompts([p], generator=torch.Generator().manual_seed(args.seed)) for p in (args.a, args.b)]
        z0 = interpolate_latents(z[0], z[1], args.frames)  # (frames + 2, C, H, W)
        z1 = pipe.sampler(pipe.model, z0, steps=args.steps, guidance_scale=args.guidance)
        images = to_pil(pipe.decode_latents(z1))
    _save_grid(images, rows=1, out=args.output, upscale=args.upscale)
    print(f"wrote {args.output} ({len(images)} frames)")


def cmd_train(argv: list[str]) -> None:
    from crossflow.train import main  # the one training parser (recipes, validation, error lines) lives there

    main(argv, prog="crossflow train")


def cmd_eval(args) -> None:
    from crossflow.checkpoint import atomic_write
    from crossflow.digits import evaluate

    if args.preset != "digits":
        raise SystemExit(f"crossflow: error: eval is defined for the digits preset only, got {args.preset!r}")
    with _backend(args.backend):
        pipe = _pipeline(args)
        res = evaluate(pipe, per_prompt=args.per_prompt, guidance_scale=args.guidance, steps=args.steps,
                       seed=args.seed, progress=not args.quiet)
    res["checkpoint"] = str(_checkpoint(args.checkpoint))
    res["guidance_scale"] = args.guidance if args.guidance is not None else pipe.sampler.guidance_scale
    res["steps"] = args.steps if args.steps is not None else pipe.sampler.steps
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        atomic_write(args.json, lambda p: Path(p).write_text(text))
    ok = res["accuracy"] >= 0.95 and res["diversity"] >= 0.5
    print(f"accuracy {res['accuracy']:.1%} (target >= 95%), diversity {res['diversity']:.1%} of real (target >= 50%)"
          f": {'PASS' if ok else 'FAIL'}")


def cmd_convert(args) -> None:
    from crossflow.config import CrossFlowConfig
    from crossflow.convert import load_official_checkpoint

    if not Path(args.checkpoint_in).exists():
        raise SystemExit(f"crossflow: error: no such file or directory: {args.checkpoint_in}")
    try:
        cfg = CrossFlowConfig.from_name(args.preset)
        model = load_official_checkpoint(args.checkpoint_in, cfg)
    except ValueError as e:  # unknown preset, wrong keys or shapes, a pickle with objects in it
        raise SystemExit(f"crossflow: error: {e}") from e
    model.save_pretrained(args.output)
    print(f"wrote {args.output} ({args.preset}, from {args.checkpoint_in})")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="model directory (default: the shipped digits model)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--backend", default="auto", help="kernels backend: auto | torch | triton")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the checkpoint's, else 50)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the checkpoint's, else 7)")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crossflow", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="prompts -> a PNG grid (one row per prompt)")
    s.add_argument("prompts", nargs="+", metavar="PROMPT")
    s.add_argument("-o", "--output", default="samples.png")
    s.add_argument("--n", type=int, default=1, help="images per prompt")
    s.add_argument("--upscale", type=int, default=4, help="nearest-neighbour upscaling of the grid")
    _common(s)
    i = sub.add_parser("interpolate", help="latent interpolation between two prompts -> a PNG strip")
    i.add_argument("a", metavar="PROMPT_A")
    i.add_argument("b", metavar="PROMPT_B")
    i.add_argument("-o", "--output", default="strip.png")
    i.add_argument("--frames", type=int, default=6, help="in-between frames (both ends are added)")
    i.add_argument("--upscale", type=int, default=4)
    _common(i)
    sub.add_parser("train", help="train a preset (see `crossflow train --help`)", add_help=False)
    e = sub.add_parser("eval", help="prompt accuracy and diversity (digits preset)")
    e.add_argument("--preset", default="digits")
    e.add_argument("--per-prompt", type=int, default=10, help="samples per (digit, held-out template)")
    e.add_argument("--json", default=None, help="also write the result to this JSON file")
    e.add_argument("--quiet", action="store_true")
    _common(e)
    c = sub.add_parser("convert", help="an official CrossFlow DiT checkpoint (.pth) -> a save_pretrained directory")
    c.add_argument("checkpoint_in", metavar="OFFICIAL", help="the official .pth (read with weights_only=True)")
    c.add_argument("--preset", required=True, help="the model it belongs to, e.g. dit-h-2-512")
    c.add_argument("-o", "--output", required=True, help="output directory")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        return cmd_train(argv[1:])
    args = build_parser().parse_args(argv)
    for name in ("n", "steps", "frames", "per_prompt", "upscale"):
        val = getattr(args, name, None)
        if val is not None and val < (0 if name == "frames" else 1):
            raise SystemExit(f"crossflow: error: --{name.replace('_', '-')} must be positive, got {val}")
    {"sample": cmd_sample, "interpolate": cmd_interpolate, "eval": cmd_eval, "convert": cmd_convert}[args.command](args)


if __name__ == "__main__":
    main()
