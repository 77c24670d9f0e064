"""The `crossflow` command: sample, interpolate, arithmetic, caption, upscale, vary, train, eval, convert.

    crossflow sample "a handwritten seven" -o seven.png          # the shipped text-to-digit model, on the CPU too
    crossflow interpolate "a handwritten one" "a handwritten seven" -o strip.png
    crossflow arithmetic "number seven, written by hand" - "seven" + "three" -o three.png   # Text VE latent arithmetic
    crossflow caption digit.png --n 3                             # image -> text (the shipped digits-caption model)
    crossflow vary --text "a handwritten seven" --n 4             # text -> text: the same digit, other wordings
    crossflow upscale low4x4.png -o up.png                        # 4x4 digit -> 8x8 (the shipped digits-sr model)
    crossflow vary digit.png -o variations.png --n 4              # image -> image: the same digit, another hand
    crossflow train --preset digits                               # reproduces the shipped weights (runs/digits)
    crossflow eval --preset digits                                # prompt accuracy and diversity of the shipped model
    crossflow convert t2i_512px_clip_dimr.pth -o ckpt/          # an official checkpoint (any of the five) -> ours

Errors print one line, `crossflow: error: ...` (`crossflow train: error: ...` for train): a mistake on the command
line, or an option this machine cannot honour (--device cuda without CUDA, --backend triton where Triton cannot run),
exits 2; anything found wrong while running (a missing or corrupt checkpoint, a disk error) exits 1; `crossflow eval`
exits 1 when the model misses its targets. CROSSFLOW_DEBUG=1 shows the traceback instead. Arguments, input images, the
output folder and the size of the grid are checked before any model loads.

This module imports only the standard library at import time: torch, transformers and the model are imported by the
verb that needs them, so `--help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from crossflow._cli_base import HelpFormatter as _HelpFormatter
from crossflow._cli_base import Parser as _Parser
from crossflow._cli_base import UsageError

# crossflow_kernels.BACKENDS, spelled out so that parsing imports no torch (tests/crossflow/test_cli.py checks them)
BACKENDS = ("auto", "torch", "triton")
# output extension -> PIL format; anything else is refused before sampling
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
MAX_UPSCALE = 16  # nearest-neighbour blow-up of a grid: 16 x 16 px digits -> 256 px cells; more only costs memory
GRID_GAP = 2  # pixels between grid cells (before upscaling), so neighbouring samples do not merge
# The largest grid written, checked before sampling: a side fits WebP (16383 px, the tightest of IMAGE_FORMATS), and
# the whole stays a picture one can open (a strip of 1,000 digits at the default size is 72,000 px wide).
MAX_GRID_SIDE = 16383
MAX_GRID_PIXELS = 50_000_000
# On the CPU, a small flow network run on few images does too little work per op for intra-op threads to pay (the
# digits preset, 2.8 M parameters, one image: matrix products of a few MFLOP), and threads competing for busy cores
# cost it dearly: 50 digits steps took 0.4-1.2 s on one thread and 14-20 s on two on a 2-core machine at load 9. A
# batch is another matter: `crossflow eval --preset digits` (100 images per call) took 34.6 s on two threads and 55.0 s
# on one on an idle 2-core machine. So one thread when parameters x images per call is under this, else torch's default
# (dit-s-2, 32.5 M, keeps the default even for one image).
SMALL_FLOW_WORK = 16_000_000


# ---------------------------------------------------------------------------------------------------------------------
# Helpers shared by the verbs (heavy imports inside)
# ---------------------------------------------------------------------------------------------------------------------


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:  # a malformed string
        raise UsageError(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} requested but CUDA is not available on this machine")
    return device


def _backend(name: str, device):
    """The kernels backend context, as `crossflow train` sets it (auto = Triton where it can run, else torch; it
    overrides CROSSFLOW_KERNELS_BACKEND). A forced triton that cannot run on `device` is refused here, before anything loads."""
    import torch

    import crossflow_kernels

    if name == "triton" and not crossflow_kernels.triton_ok(torch.empty(0, device=device)):
        where = ("Triton needs a CUDA device (or TRITON_INTERPRET=1 for the slow CPU interpreter)"
                 if device.type == "cpu" else "Triton is built for the CPU interpreter here (TRITON_INTERPRET=1)")
        raise UsageError(f"--backend triton cannot run on {device}: {where}; use --backend auto or torch")
    return crossflow_kernels.use_backend(name)


def _checkpoint(path: str | None, preset: str = "digits") -> str:
    """--checkpoint, default the shipped weights of `preset`; refused now unless it holds a checkpoint's files."""
    from crossflow.checkpoint import is_checkpoint
    from crossflow.pipelines.base import default_checkpoint

    path = path or default_checkpoint(preset)
    is_checkpoint(path)
    return path


def _model_config(ckpt: str):
    """The checkpoint's config.json alone (no weights): what the inputs and the grid are checked against before the
    model loads."""
    from crossflow.config import read_checkpoint_info

    return read_checkpoint_info(ckpt)[0]


def _image_size(cfg) -> int:
    """The side of the images a model draws: its latent's, times 8 through the SD VAE."""
    return cfg.latent_size * (1 if cfg.autoencoder == "identity" else 8)


def _check_grid(args, ckpt: str, cells: int, rows: int, flag: str) -> None:
    """Refuse, before sampling, a grid over MAX_GRID_SIDE px a side or MAX_GRID_PIXELS in all."""
    cell, cols = _image_size(_model_config(ckpt)), -(-cells // rows)
    w, h = ((cols * cell + (cols - 1) * args.gap) * args.upscale, (rows * cell + (rows - 1) * args.gap) * args.upscale)
    if max(w, h) > MAX_GRID_SIDE or w * h > MAX_GRID_PIXELS:
        raise UsageError(f"{flag}: the grid of {cells} images would be {w}x{h} px, over the limit of {MAX_GRID_SIDE} px "
                         f"a side and {MAX_GRID_PIXELS // 1_000_000} megapixels; ask for fewer images or a smaller "
                         "--upscale")


def _read_inputs(paths: list[str], size: int, max_size: int | None = None) -> list:
    """Input images read now, before any model loads (`image_io.read_grey`: errors name the file); one stderr line per
    file that was converted (bit depth, transparency, colour, inversion, size)."""
    from crossflow.pipelines.image_io import read_grey

    images, notes = read_grey(paths, size, max_size)
    for line in notes:
        print(f"crossflow: note: {line}", file=sys.stderr)
    return images


_threads_before: list[int] = []  # the count `_cap_threads` replaced; `main` puts it back (cli.main called in-process)


def _cap_threads(model, device, threads: int | None, images: int = 1) -> None:
    """Intra-op threads: --threads if given; else one for little work on the CPU (flow parameters x `images` per call
    under SMALL_FLOW_WORK), unless OMP_NUM_THREADS was set by the user; else torch's default."""
    import torch

    params = sum(p.numel() for p in getattr(model, "flow", model).parameters())
    small = params * max(1, images) < SMALL_FLOW_WORK
    if threads is None and device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ and small:
        threads = 1
    if threads is not None:
        _threads_before.append(torch.get_num_threads())
        torch.set_num_threads(threads)


def _restore_threads() -> None:
    if _threads_before:
        import torch

        torch.set_num_threads(_threads_before[0])
        _threads_before.clear()


def _check_task(args) -> None:
    """Refuse a --checkpoint made for another verb from its config.json alone, before anything heavy is imported."""
    from crossflow.config import CrossFlowConfig, WrongTaskError, check_task

    if getattr(args, "checkpoint", None) is None:
        return  # the shipped default fits
    if args.command == "vary":
        if (args.text is None) == (not args.images):
            return  # a usage error, reported by the verb
        tasks = ("image-to-text",) if args.text is not None else ("image-variation",)
        user = "crossflow vary " + ("--text" if args.text is not None else "IMAGE")
    elif args.command == "eval":
        tasks, user = (CrossFlowConfig.from_name(args.preset).task,), f"crossflow eval --preset {args.preset}"
    else:
        tasks = {"caption": ("image-to-text",), "upscale": ("super-resolution",)}.get(args.command, ("text-to-image",))
        user = f"crossflow {args.command}"
    try:
        check_task(args.checkpoint, tasks, user)
    except WrongTaskError as e:  # a command-line mistake
        raise UsageError(str(e)) from None
    except FileNotFoundError:  # reported where it loads
        pass


def _pipeline(args, device, preset: str = "digits", images: int = 1):
    """The pipeline of `preset`'s task from --checkpoint (default: the preset's shipped weights), with the
    checkpoint's recommended sampler settings; --steps/--guidance act per call."""
    from crossflow.pipelines.caption import CaptionPipeline
    from crossflow.pipelines.image import ImagePipeline
    from crossflow.pipelines.text_to_image import CrossFlowPipeline

    cls = {"digits": CrossFlowPipeline, "digits-caption": CaptionPipeline}.get(preset, ImagePipeline)
    pipe = cls.from_pretrained(_checkpoint(args.checkpoint, preset), device=device, sampler=args.sampler)
    _cap_threads(pipe.model, device, args.threads, images)
    return pipe


def save_grid(images: list, rows: int, out: str, upscale: int = 1, gap: int = 0) -> None:
    """Tile PIL images into a rows x cols grid (row-major) with `gap` background pixels between cells,
    nearest-neighbour upscaled, written atomically in the format `out`'s extension names (IMAGE_FORMATS)."""
    from PIL import Image

    from crossflow.checkpoint import atomic_write

    fmt = IMAGE_FORMATS[Path(out).suffix.lower()]
    cols = -(-len(images) // rows)
    w, h = images[0].size
    grid = Image.new(images[0].mode, (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * (w + gap), (i // cols) * (h + gap)))
    if upscale > 1:
        grid = grid.resize((grid.width * upscale, grid.height * upscale), Image.NEAREST)
    atomic_write(out, lambda p: grid.save(p, format=fmt))


# ---------------------------------------------------------------------------------------------------------------------
# Verbs
# ---------------------------------------------------------------------------------------------------------------------


def cmd_sample(args) -> int:
    _check_grid(args, _checkpoint(args.checkpoint), len(args.prompts) * args.n, len(args.prompts), "--n")
    device = _device(args.device)
    with _backend(args.backend, device):
        pipe = _pipeline(args, device, images=len(args.prompts) * args.n)
        images = pipe(args.prompts, num_images_per_prompt=args.n, steps=args.steps, guidance_scale=args.guidance,
                      seed=args.seed, progress=not args.quiet)
    save_grid(images, rows=len(args.prompts), out=args.output, upscale=args.upscale, gap=args.gap)
    w, h = images[0].size
    print(f"wrote {args.output} ({len(args.prompts)} prompt(s) x {args.n}, {w}x{h} px each, upscaled x{args.upscale})")
    return 0


def cmd_interpolate(args) -> int:
    import torch

    from crossflow.sampling import interpolate_latents

    _check_grid(args, _checkpoint(args.checkpoint), args.frames + 2, 1, "--frames")
    device = _device(args.device)
    with _backend(args.backend, device):
        pipe = _pipeline(args, device, images=args.frames)
        z = [pipe.encode_prompts(p, generator=torch.Generator().manual_seed(args.seed)) for p in (args.a, args.b)]
        images = pipe(z0=interpolate_latents(z[0], z[1], args.frames), steps=args.steps, guidance_scale=args.guidance,
                      progress=not args.quiet)
    save_grid(images, rows=1, out=args.output, upscale=args.upscale, gap=args.gap)
    print(f"wrote {args.output} ({len(images)} frames)")
    return 0


def cmd_arithmetic(args) -> int:
    """z0 = standardise(VE(A) + sum VE(+ terms) - sum VE(- terms)) (`sampling.latent_arithmetic`, the official demo's
    rule), then the usual sampler. Every term draws its Text VE noise from the same seed, so the noise of A is not
    washed out by independent draws (as `interpolate` does)."""
    import torch

    from crossflow.sampling import latent_arithmetic

    first, ops = args.terms
    _check_grid(args, _checkpoint(args.checkpoint), args.n, 1, "--n")
    device = _device(args.device)
    with _backend(args.backend, device):
        pipe = _pipeline(args, device)

        def latent(prompt: str):  # (n, C, H, W)
            return pipe.encode_prompts(prompt, args.n, generator=torch.Generator().manual_seed(args.seed))

        plus = [latent(p) for sign, p in ops if sign == "+"]
        minus = [latent(p) for sign, p in ops if sign == "-"]
        z0 = latent_arithmetic(latent(first), sum(plus) if plus else None, sum(minus) if minus else None)
        images = pipe(z0=z0, steps=args.steps, guidance_scale=args.guidance, progress=not args.quiet)
    save_grid(images, rows=1, out=args.output, upscale=args.upscale, gap=args.gap)
    expr = " ".join([repr(first)] + [f"{sign} {p!r}" for sign, p in ops])
    print(f"wrote {args.output} ({expr}: {len(images)} image(s))")
    return 0


def cmd_caption(args) -> int:
    """One caption per line: the --n captions of the first image, then the next image's; with several images each
    line starts with its file name (`a.png: ...`)."""
    from crossflow.pipelines.image_io import load_images, open_image

    cfg = _model_config(_checkpoint(args.checkpoint, "digits-caption"))
    size = cfg.source_size
    inputs = _read_inputs(args.images, size) if cfg.source_channels == 1 else [open_image(p) for p in args.images]
    device = _device(args.device)
    with _backend(args.backend, device):
        pipe = _pipeline(args, device, "digits-caption")
        images = load_images(inputs, cfg.source_channels, size)
        captions = pipe(images, args.n, steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
    if len(args.images) > 1:
        captions = [f"{args.images[i // args.n]}: {c}" for i, c in enumerate(captions)]
    print("\n".join(captions))
    return 0


def cmd_vary(args) -> int:
    """`--text TEXT`: n rewordings, one per line; `IMAGE...`: a grid of n variations per image (one row each)."""
    if (args.text is None) == (not args.images):
        raise UsageError("give IMAGE file(s) or --text TEXT (not both)")
    device = _device(args.device)
    if args.text is not None:
        if args.output is not None:
            raise UsageError("-o/--output is for image variation; text variations are printed")
        with _backend(args.backend, device):
            pipe = _pipeline(args, device, "digits-caption")
            texts = pipe.vary_text(args.text, args.n, steps=args.steps, seed=args.seed)
        print("\n".join(texts))
        return 0
    output = args.output or "variations.png"
    ckpt = _checkpoint(args.checkpoint, "digits-vary")
    images = _read_inputs(args.images, _model_config(ckpt).source_size)
    _check_grid(args, ckpt, len(images) * args.n, len(images), "--n")
    with _backend(args.backend, device):
        pipe = _pipeline(args, device, "digits-vary")
        out = pipe(images, num_images_per_image=args.n, steps=args.steps, guidance_scale=args.guidance,
                   seed=args.seed, output_type="pil", progress=not args.quiet)
    save_grid(out, rows=len(images), out=output, upscale=args.upscale, gap=args.gap)
    w, h = out[0].size
    print(f"wrote {output} ({len(images)} image(s) x {args.n} variations, {w}x{h} px each, upscaled x{args.upscale})")
    return 0


def cmd_train(argv: list[str]) -> None:
    # the one training parser, without torch: --help answers at once
    from crossflow.training.train_config import parse_config

    tc = parse_config(argv, prog="crossflow train")
    from crossflow.training.train import run

    run(tc, prog="crossflow train")


def _sweep(args, device) -> int:
    """`crossflow eval --sweep-steps`: the sweep's JSON on stdout (and --json), its recommendation on the last line."""
    from crossflow.checkpoint import atomic_write
    from crossflow.digits.sweep import sweep

    extra = {} if args.posterior_samples is None else {"posterior_samples": args.posterior_samples}
    with _backend(args.backend, device):
        pipe = _pipeline(args, device, args.preset, images=10 * args.per_prompt if args.preset == "digits" else 1)
        res = sweep(args.preset, pipe, _checkpoint(args.checkpoint, args.preset), steps=args.sweep_steps,
                    samplers=args.sweep_samplers, baseline=args.sweep_baseline, reference=args.sweep_reference,
                    noise_seeds=args.sweep_noise_seeds, guidance_scale=args.guidance, seed=args.seed,
                    per_prompt=args.per_prompt, per_image=args.per_image, **extra,
                    log=None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True))
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        atomic_write(args.json, lambda p: Path(p).write_text(text + "\n"))
    r = res["recommended"]
    if r is None:
        print("recommended: none: no setting of the grid passes every bar (the full eval's too) within noise of the "
              "converged solution")
        return 1
    b = r["baseline"]
    print(f"recommended: {r['sampler']} x {r['steps']} steps = {r['nfe']} NFE, within noise of the converged solution "
          f"on every judged number, against {b['sampler']} x {b['steps']} = {b['nfe']} NFE"
          f"{'' if b['within_noise'] else ' (which is not)'}: {r['saving']:.1f}x fewer network evaluations")
    return 0


def cmd_eval(args) -> int:
    """Prints the result and a PASS/FAIL line; exits 1 on FAIL."""
    from crossflow.checkpoint import atomic_write
    from crossflow.digits import eval as judge

    device = _device(args.device)
    if args.sweep_steps:
        return _sweep(args, device)
    with _backend(args.backend, device):
        # digits: one call draws ten digits x --per-prompt images
        pipe = _pipeline(args, device, args.preset, images=10 * args.per_prompt if args.preset == "digits" else 1)
        res = judge.run(args.preset, pipe, _checkpoint(args.checkpoint, args.preset), steps=args.steps,
                        guidance_scale=args.guidance, seed=args.seed, per_prompt=args.per_prompt,
                        per_image=args.per_image, progress=not args.quiet,
                        **({} if args.posterior_samples is None else {"posterior_samples": args.posterior_samples}))
    if args.baselines:
        from crossflow.digits.baselines import run_all

        res["baselines"] = run_all(args.preset)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        atomic_write(args.json, lambda p: Path(p).write_text(text + "\n"))
    ok, line = judge.verdict(args.preset, res)
    print(f"{line}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def cmd_upscale(args) -> int:
    """4x4 digit images -> 8x8 (`digits-sr`): one row per input, its --n outputs."""
    ckpt = _checkpoint(args.checkpoint, "digits-sr")
    cfg = _model_config(ckpt)
    images = _read_inputs(args.inputs, cfg.source_size, max_size=_image_size(cfg))  # refuses what it would shrink
    _check_grid(args, ckpt, len(images) * args.n, len(images), "--n")
    device = _device(args.device)
    with _backend(args.backend, device):
        pipe = _pipeline(args, device, "digits-sr")
        out = pipe(images, num_images_per_image=args.n, steps=args.steps, guidance_scale=args.guidance,
                   seed=args.seed, output_type="pil", progress=not args.quiet)
    save_grid(out, rows=len(images), out=args.output, upscale=args.upscale, gap=args.gap)
    w, h = out[0].size
    print(f"wrote {args.output} ({len(images)} input(s) x {args.n}, {w}x{h} px each, upscaled x{args.upscale})")
    return 0


def cmd_convert(args) -> int:
    from crossflow.config import CrossFlowConfig
    from crossflow.convert.dit import load_official_checkpoint, preset_name, save_converted

    if not Path(args.checkpoint_in).exists():
        raise FileNotFoundError(f"no such file or directory: {args.checkpoint_in}")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise UsageError(f"-o/--output {args.output} is a file; it must be a directory (created if missing)")
    cfg = CrossFlowConfig.from_name(args.preset) if args.preset else None  # ValueError names an unknown preset
    model = load_official_checkpoint(args.checkpoint_in, cfg)  # detects the layout; refuses a mismatching preset
    save_converted(model, args.output)
    print(f"wrote {args.output} ({args.preset or preset_name(model.config)}, from {args.checkpoint_in}; sampling.json: "
          "the official sampler)")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Parsers: one per verb
# ---------------------------------------------------------------------------------------------------------------------


def _int_at_least(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            val = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if val < low or (high is not None and val > high):
            raise argparse.ArgumentTypeError(f"must be {'>= ' + str(low) if high is None else f'in {low}..{high}'}"
                                             f", got {val}")
        return val

    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


def _list_of(parse, name: str, choices: tuple[str, ...] | None = None):
    """A comma-separated list, each item parsed by `parse` (or one of `choices`), no repeats."""

    def parse_list(text: str) -> tuple:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {name}, got {text!r}")
        if choices is not None:
            bad = [t for t in items if t not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"{bad[0]!r} is not one of {', '.join(choices)}")
            out = tuple(items)
        else:
            out = tuple(parse(t) for t in items)
        if len(set(out)) != len(out):
            raise argparse.ArgumentTypeError(f"{text!r} names an item twice")
        return out

    parse_list.__name__ = "list"
    return parse_list


def _setting(choices: tuple[str, ...]):
    """SAMPLER:STEPS, e.g. euler:50."""

    def parse_setting(text: str) -> tuple[str, int]:
        name, _, steps = text.partition(":")
        if name not in choices:
            raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(choices)} (expected SAMPLER:STEPS)")
        return name, _int_at_least(1)(steps)

    parse_setting.__name__ = "setting"
    return parse_setting


def _guidance(text: str) -> float:
    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not val >= 0 or val == float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return val


def _prompt(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("a prompt must not be empty or whitespace only")
    return text


def _output_file(text: str) -> str:
    """A file to write: its folder must be writable now (missing folders are created when it is written, so the
    nearest existing one must be), so that no run ends in an error about a temporary file."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; name the file to write")
    folder = Path(text).absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: the folder {folder} is not writable")
    return text


def _image_path(text: str) -> str:
    if Path(text).suffix.lower() not in IMAGE_FORMATS and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: the extension names the image format; use one of "
                                         f"{', '.join(sorted(IMAGE_FORMATS))}")
    return _output_file(text)


class _ArithmeticTerms(argparse.Action):
    """PROMPT {+,-} PROMPT [{+,-} PROMPT ...] -> (first prompt, [(sign, prompt), ...]); anything else is a usage
    error naming the offending word."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        words = list(values)
        if len(words) == 1:
            parser.error(f"arithmetic: expected PROMPT followed by at least one '+ PROMPT' or '- PROMPT', got only "
                         f"{words[0]!r}")
        for i, w in enumerate(words):
            if i % 2 and w not in ("+", "-"):
                a, b = words[i - 1], w
                what = (f"a prompt, not an operator: write {a!r} + {b!r} or {a!r} - {b!r}"
                        if any(c.isalnum() for c in w) else "not an operator")
                parser.error(f"arithmetic: expected '+' or '-' between prompts, got {w!r}, {what} (quote multi-word "
                             "prompts)")
            if not i % 2 and (not w.strip() or w in ("+", "-")):
                parser.error(f"arithmetic: prompt {i // 2 + 1} is {w!r}; prompts must be non-empty text")
        if len(words) % 2 == 0:
            parser.error(f"arithmetic: the operator {words[-1]!r} at the end has no prompt after it")
        setattr(namespace, self.dest, (words[0], list(zip(words[1::2], words[2::2]))))


def _common(p: argparse.ArgumentParser, default_model: str = "the shipped digits model",
            preset: str | None = "digits") -> None:
    """The options every sampling verb has; `preset`: the shipped model whose sampling.json the help quotes (None:
    it depends on another option)."""
    p.add_argument("--checkpoint", default=None, help=f"model directory (default: {default_model})")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="kernels backend; auto: Triton where it can run, else torch")
    from crossflow.config import SAMPLERS, SAMPLING  # torch-free; the shipped weights' sampling.json carries the same

    shipped = SAMPLING.get(preset, {}) if preset else {}

    def default(key: str, fallback: str) -> str:
        own = f"; the shipped model's: {shipped[key]:g}" if key in shipped else ""
        return f"default: the checkpoint's sampling.json{own}; without one, its preset's, else {fallback}"

    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="the ODE solver: euler; midpoint (second order, 2 network evaluations a step); diffusers' "
                   "flow-euler, flow-heun, dpm++, unipc (default: the checkpoint's sampling.json, else euler)")
    p.add_argument("--steps", type=_int_at_least(1), default=None, help=f"solver steps ({default('steps', '50')})")
    p.add_argument("--guidance", type=_guidance, default=None,
                   help=f"guidance scale >= 0, 1 = off ({default('guidance_scale', '7')})")
    p.add_argument("--seed", type=int, default=0, help="fixed by default: the same command draws the same images")
    p.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="CPU threads (default: 1 for small models, else torch's default)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _image_out(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("-o", "--output", type=_image_path, default=default,
                   help=f"image file; the extension picks the format ({', '.join(sorted(IMAGE_FORMATS))}); the grid "
                   f"may be at most {MAX_GRID_SIDE} px a side and {MAX_GRID_PIXELS // 1_000_000} megapixels")
    p.add_argument("--upscale", type=_int_at_least(1, MAX_UPSCALE), default=4,
                   help=f"nearest-neighbour upscaling of the grid, 1..{MAX_UPSCALE}")
    p.add_argument("--gap", type=_int_at_least(0, 64), default=GRID_GAP, help="pixels between cells, before upscaling")


def build_parser() -> argparse.ArgumentParser:
    from crossflow.config import SAMPLERS  # torch-free
    p = _Parser(prog="crossflow", description=__doc__.split("\n\n")[0],
                epilog="CROSSFLOW_DEBUG=1 shows a traceback for errors.", formatter_class=_HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True,
                           metavar="{sample,interpolate,arithmetic,caption,upscale,vary,train,eval,convert}")
    s = sub.add_parser("sample", help="prompts -> an image grid (one row per prompt)", formatter_class=_HelpFormatter)
    s.add_argument("prompts", nargs="+", metavar="PROMPT", type=_prompt,
                   help='text prompts, one grid row each; quote each one ("a handwritten seven")')
    _image_out(s, "samples.png")
    s.add_argument("--n", type=_int_at_least(1), default=1, help="images per prompt")
    _common(s)
    s.set_defaults(func=cmd_sample)
    i = sub.add_parser("interpolate", help="latent interpolation between two prompts -> an image strip",
                       formatter_class=_HelpFormatter)
    i.add_argument("a", metavar="PROMPT_A", type=_prompt, help="the prompt of the first frame (quoted)")
    i.add_argument("b", metavar="PROMPT_B", type=_prompt, help="the prompt of the last frame (quoted)")
    _image_out(i, "strip.png")
    i.add_argument("--frames", type=_int_at_least(0), default=6, help="in-between frames (both ends are added)")
    _common(i)
    i.set_defaults(func=cmd_interpolate)
    a = sub.add_parser("arithmetic", help='Text VE latent arithmetic: "A" - "B" + "C" -> one row of images',
                       formatter_class=_HelpFormatter,
                       description="Combine the Text VE latents of prompts, standardise the sum (as the official "
                                   "demo), and sample from it.")
    a.add_argument("terms", nargs="+", action=_ArithmeticTerms, metavar="TERM",
                   help='PROMPT {+,-} PROMPT [{+,-} PROMPT ...], e.g. "number seven, written by hand" - "seven" + '
                        '"three" (quote each prompt)')
    _image_out(a, "arithmetic.png")
    a.add_argument("--n", type=_int_at_least(1), default=4, help="images (each with its own Text VE noise)")
    _common(a)
    a.set_defaults(func=cmd_arithmetic)
    cap = sub.add_parser("caption", help="images -> captions, one per line (image -> text model)",
                         formatter_class=_HelpFormatter)
    cap.add_argument("images", nargs="+", metavar="IMAGE", help="image files of a digit, resized to the model's "
                     "size (16x16 for the shipped one): grey or colour, 8 or 16 bits, ink bright on a dark ground or dark on a light one (inverted), or drawn in the alpha channel; a line on stderr says what was converted")
    cap.add_argument("--n", type=_int_at_least(1), default=1, help="captions per image (one seed, different noise)")
    _common(cap, "the shipped digits-caption model", "digits-caption")
    cap.set_defaults(func=cmd_caption)
    u = sub.add_parser("upscale", help="4x4 digit images -> 8x8 (super-resolution, the digits-sr model)",
                       formatter_class=_HelpFormatter)
    u.add_argument("inputs", nargs="+", metavar="IN", help="image files of a digit smaller than the output (the "
                   "shipped model: 4x4 in, 8x8 out; other sizes under 8x8 are resized to 4x4, 8x8 and up refused): "
                   "grey or colour, 8 or 16 bits, ink bright on a dark ground or dark on a light one (inverted), or drawn in the alpha channel; a line on stderr says what was converted")
    _image_out(u, "upscaled.png")
    u.add_argument("--n", type=_int_at_least(1), default=1, help="outputs per input (one row per input)")
    _common(u, "the shipped digits-sr model", "digits-sr")
    u.set_defaults(func=cmd_upscale, upscale=8)
    v = sub.add_parser("vary", help="variations: IMAGE... -> an image grid, or --text TEXT -> rewordings",
                       formatter_class=_HelpFormatter)
    v.add_argument("images", nargs="*", metavar="IMAGE", help="image files to vary (image variation), resized to "
                   "the model's size (8x8 for the shipped one): grey or colour, 8 or 16 bits, ink bright on a dark ground or dark on a light one (inverted), or drawn in the alpha channel; a line on stderr says what was converted")
    v.add_argument("--text", type=_prompt, default=None, help="a text to reword (text variation, printed)")
    v.add_argument("-o", "--output", type=_image_path, default=None,
                   help="image variation: the grid file (default variations.png)")
    v.add_argument("--upscale", type=_int_at_least(1, MAX_UPSCALE), default=4,
                   help=f"image variation: nearest-neighbour upscaling of the grid, 1..{MAX_UPSCALE}")
    v.add_argument("--gap", type=_int_at_least(0, 64), default=GRID_GAP, help="pixels between cells, before upscaling")
    v.add_argument("--n", type=_int_at_least(1), default=4, help="variations per input")
    _common(v, "the shipped digits-vary model for images, digits-caption for --text", None)
    v.set_defaults(func=cmd_vary, upscale=8)  # 8x8 variations
    sub.add_parser("train", help="train a preset (see `crossflow train --help`)", add_help=False)
    e = sub.add_parser("eval", help="a preset's numbers (digits: prompt accuracy, diversity, background speckle; digits-caption: "
                       "caption accuracy, well-formedness, wordings, text variation); exits 1 below target",
                       formatter_class=_HelpFormatter)
    e.add_argument("--preset", default="digits", choices=("digits", "digits-caption", "digits-sr", "digits-vary"),
                   help="the evaluation to run (and, without --checkpoint, the shipped weights it judges)")
    e.add_argument("--per-prompt", type=_int_at_least(2), default=10, help="samples per (digit, held-out template)")
    e.add_argument("--per-image", type=_int_at_least(2), default=4, help="digits-vary: variations per held-out image")
    e.add_argument("--posterior-samples", type=_int_at_least(1), default=None, metavar="N",
                   help="digits-sr: also judge the mean of N samples per input, the least-squares estimate set "
                   "against the regression baselines (default 32)")
    e.add_argument("--json", type=_output_file, default=None, help="also write the result to this JSON file")
    e.add_argument("--baselines", action="store_true",
                   help="also train and judge the simple baselines on the same split (super-resolution: ridge, kNN, "
                   "MLP; captioning: an SVC + a fixed sentence; variation: the nearest training digit; text to image: "
                   "retrieval) and report them beside the model under \"baselines\"")
    e.add_argument("--sweep-steps", type=_list_of(_int_at_least(1), "step counts"), default=None, metavar="N,N,...",
                   help="quality against NFE: the eval at each step count (e.g. 1,2,4,8,16,25,50) for each of "
                   "--sweep-samplers, each point's distance to a converged solution, and the cheapest setting whose "
                   "judged numbers are within noise of the converged solution's (one JSON; plot it with "
                   "python -m benchmarks.report)")
    e.add_argument("--sweep-samplers", type=_list_of(None, "samplers", SAMPLERS), default="euler,midpoint",
                   metavar="NAME,...", help=f"with --sweep-steps: the samplers ({', '.join(SAMPLERS)})")
    e.add_argument("--sweep-baseline", type=_setting(SAMPLERS), default="euler:50", metavar="SAMPLER:STEPS",
                   help="with --sweep-steps: the setting the saving is counted against")
    e.add_argument("--sweep-reference", type=_setting(SAMPLERS), default="midpoint:128", metavar="SAMPLER:STEPS",
                   help="with --sweep-steps: the fine solve that stands for the converged solution")
    e.add_argument("--sweep-noise-seeds", type=_int_at_least(2), default=3, metavar="N",
                   help="with --sweep-steps: the reference runs at N seeds; a number's noise is its spread over them")
    _common(e, "the shipped weights of --preset", None)
    e.set_defaults(func=cmd_eval)
    c = sub.add_parser("convert", help="an official CrossFlow checkpoint (.pth: DiT or DiMR) -> a save_pretrained "
                       "directory with the official sampler settings", formatter_class=_HelpFormatter)
    c.add_argument("checkpoint_in", metavar="OFFICIAL", help="the official .pth (read with weights_only=True)")
    c.add_argument("--preset", default=None,
                   help="the model it must be, e.g. dimr-512-clip (default: detected from the file's layout)")
    c.add_argument("-o", "--output", required=True, help="output directory")
    c.set_defaults(func=cmd_convert)
    return p


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------

# What a user can cause: an option this machine cannot honour (UsageError: exit 2, as `crossflow train` does), bad
# files, values a library refuses (exit 1); one line each. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, RuntimeError, OSError)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"crossflow: warning: {_one_line(message)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one verb; returns 0, or raises SystemExit with 2 (usage) or 1 (a runtime error, an eval FAIL)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    shown, warnings.showwarning = warnings.showwarning, _warning_line  # a warning is one line too
    try:
        if argv[:1] == ["train"]:
            cmd_train(argv[1:])
            return 0
        args = build_parser().parse_args(argv)
        _check_task(args)
        code = args.func(args)
    except USER_ERRORS as e:
        if os.environ.get("CROSSFLOW_DEBUG", "") not in ("", "0"):
            raise
        print(f"crossflow: error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, UsageError) else 1) from None
    except KeyboardInterrupt:
        print("crossflow: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        warnings.showwarning = shown
        _restore_threads()
    if code:
        raise SystemExit(code)
    return 0


if __name__ == "__main__":
    main()
