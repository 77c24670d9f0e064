"""diffusers' DiT-XL/2-256 sampling (`DiTPipeline`, random weights, the real configuration), unpatched vs patched by
`crossflow_kernels.integrations.diffusers.apply`: the pytest-benchmark suite and the GPU check's `diffusers` stage.

Providers (`PROVIDERS`), each on its own copy of the transformer:
  unpatched_eager    diffusers as shipped (SDPA attention, torch norms)
  patched_eager      after `apply` (default backend: Triton on CUDA, the interpreter in the CPU smoke)
  unpatched_compile  each transformer block `.compile()`d (regional: the 28 blocks share one graph), default mode
  patched_compile    the same after `apply` (our Triton custom ops inside the compiled graph)
CPU / tiny: a 2-layer DiT and a 1-level VAE; compiles use backend="eager" on the torch reference ops (Inductor's C++
build takes minutes on a small CPU; the smoke checks the code, not the speed).

A case: `pipe(class_labels=B labels, num_inference_steps=steps, guidance_scale=4, output_type="pt")` (classifier-free
guidance: the transformer sees 2B rows; DDIM scheduler; the SD VAE decode included). One warm-up call (3 steps; for a
compile provider it compiles), then timed calls of `steps`; latency = median wall time of one call for B images,
images_per_s = B / latency, speedup = unpatched_eager latency / this latency (same batch), max_abs_diff = the largest
pixel difference from unpatched_eager's images (same seed; images in [0, 1]).

diffusers is not installed on the GPU machine: without it the stage records a skip with this note, and the suite skips.
To run it there, carry the wheel (benchmarks/README.md): `pip download diffusers --no-deps -d wheels/`, then
`pip install --no-deps wheels/diffusers-*.whl` in the device command before `run_gpu.sh`.

Heavy imports happen inside the functions: the GPU check's driver imports this module and must not import
`crossflow_kernels` before its interpreter switch.
"""

from __future__ import annotations

import functools
import importlib.util
import statistics
import time
from typing import Any, Callable

# facebook/DiT-XL-2-256's transformer config (the defaults of DiTTransformer2DModel, learned sigma: 8 out channels).
DIT_XL_2_256 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                    sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
DIT_TINY = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=256,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
VAE_TINY = dict(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=8)
GUIDANCE = 4.0  # DiTPipeline's default
STEPS, BATCHES, ROUNDS = 50, (1, 8), 2
PROVIDERS = ("unpatched_eager", "patched_eager", "unpatched_compile", "patched_compile")
COMPILE_MIN_LEFT_S = 25  # a cold regional compile of a DiT-XL/2 block and its runs; else the case is skipped, said so


def diffusers_missing() -> str | None:
    """None when diffusers can be imported, else the note the stage and the suite record."""
    if importlib.util.find_spec("diffusers") is None:
        return ("diffusers is not installed here: carry its wheel to run this (benchmarks/README.md, "
                "'The diffusers stage')")
    return None


@functools.lru_cache(maxsize=1)
def build_pipe(tiny: bool, dtype_name: str):
    """A DiTPipeline of random weights on the default device: DiT-XL/2-256 + the SD VAE (tiny: a 2-layer DiT)."""
    import diffusers
    import torch

    from benchmarks._common import device

    torch.manual_seed(0)
    with torch.device(device()):  # initialise on the GPU: 675 M parameters would take long on the CPU
        transformer = diffusers.DiTTransformer2DModel(**(DIT_TINY if tiny else DIT_XL_2_256))
        vae = diffusers.AutoencoderKL(**(VAE_TINY if tiny else SD_VAE))
    pipe = diffusers.DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=diffusers.DDIMScheduler())
    pipe.to(getattr(torch, dtype_name))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_provider(name: str, pipe, tiny: bool) -> tuple[Callable[[int, int], Any], str]:
    """-> (run(batch, steps) -> images, backend description) on a copy of `pipe`'s transformer."""
    import copy

    import diffusers
    import torch

    import crossflow_kernels
    from crossflow_kernels.integrations import diffusers as ckd

    transformer = pipe.transformer if name == "unpatched_eager" else copy.deepcopy(pipe.transformer)
    cuda = torch.cuda.is_available()
    backend = "auto"
    if name.startswith("patched"):
        report = ckd.apply(transformer).as_dict()
        if not cuda and name.endswith("compile"):
            backend = "torch"  # the CPU smoke traces the reference ops (the interpreter is not compiled)
    if name.endswith("compile"):
        torch._dynamo.reset()
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for block in transformer.transformer_blocks:
            block.compile(**(dict(dynamic=False) if cuda and not tiny else dict(backend="eager")))
    p = diffusers.DiTPipeline(transformer=transformer, vae=pipe.vae, scheduler=pipe.scheduler)
    p.set_progress_bar_config(disable=True)

    def run(batch: int, steps: int):
        gen = torch.Generator(pipe.device).manual_seed(0)
        with torch.no_grad(), crossflow_kernels.use_backend(backend):
            return p(class_labels=[i % 1000 for i in range(batch)], num_inference_steps=steps,
                     guidance_scale=GUIDANCE, generator=gen, output_type="pt").images

    what = ("diffusers (torch)" if not name.startswith("patched") else f"crossflow_kernels {backend}"
            + (" (interpreter)" if backend != "torch" and crossflow_kernels.interpreting() else ""))
    if name.endswith("compile"):
        what += ", compile per block (" + ("default mode" if cuda and not tiny else "backend=eager [smoke]") + ")"
    run.report = report if name.startswith("patched") else None  # what apply fused / left, for the results
    return run, what


def timed(run: Callable, batch: int, steps: int, times: list[float]):
    """One call, its synchronised wall time appended to `times`; returns the images."""
    from benchmarks._common import sync

    t0 = time.perf_counter()
    images = run(batch, steps)
    sync()
    times.append(time.perf_counter() - t0)
    return images


def time_case(run: Callable, batch: int, steps: int, rounds: int) -> dict[str, Any]:
    """Warm-up (3 steps: compiles, autotunes), then `rounds` timed calls; the last call's images under "images"."""
    warm: list[float] = []
    timed(run, batch, min(3, steps), warm)
    times: list[float] = []
    for _ in range(rounds):
        images = timed(run, batch, steps, times)
    latency = statistics.median(times)
    return dict(status="ok", timer="perf_counter+sync", latency_s=latency, latency_all_s=times,
                images_per_s=batch / latency, warmup_s=warm[0], images=images)


# ---------------------------------------------------------------------------------------------------------------------
# The GPU check's stage
# ---------------------------------------------------------------------------------------------------------------------


def stage_diffusers(ctx) -> None:
    """DiT-XL/2-256 sampling at batch 1 and 8: eager cases first, then the compiles (batch 8 first), each compile
    skipped with a note when under COMPILE_MIN_LEFT_S remain."""
    missing = diffusers_missing()
    if missing:
        ctx.set_result(skipped=True, note=missing)
        ctx.add_case(dict(status="skipped", reason=missing))
        ctx.log(f"diffusers: skipped ({missing})")
        return
    ctx.need_cuda()
    import diffusers
    import torch

    tiny = ctx.smoke
    dtype = "float32" if tiny else "bfloat16"  # the interpreter has no bf16
    batches, steps = ((1,), 2) if tiny else (BATCHES, STEPS)
    order = [(b, p) for b in batches for p in PROVIDERS[:2]] + [(b, p) for b in sorted(batches, reverse=True)
                                                                 for p in PROVIDERS[2:]]
    ctx.set_result(model="DiT-XL/2-256 (random weights)" if not tiny else "tiny DiT (smoke)", steps=steps,
                   rounds=ROUNDS, guidance_scale=GUIDANCE, dtype=dtype, diffusers=diffusers.__version__,
                   order=[f"{p}-b{b}" for b, p in order])
    t0 = time.perf_counter()
    pipe = build_pipe(tiny, dtype)
    ctx.set_result(build_s=time.perf_counter() - t0)
    ref: dict[int, tuple[float, Any]] = {}  # batch -> (unpatched eager latency, images)
    saved_report = False
    for batch, name in order:
        case = dict(model="dit-xl-2-256" if not tiny else "dit-tiny", batch=batch, steps=steps, provider=name,
                    dtype=dtype)
        if name.endswith("compile") and not tiny and ctx.remaining() < COMPILE_MIN_LEFT_S:
            case.update(status="skipped", reason=f"{ctx.remaining():.0f} s left in the stage budget, a cold block "
                        f"compile needs about {COMPILE_MIN_LEFT_S} s")
        else:
            try:
                run, case["backend"] = make_provider(name, pipe, tiny)
                if run.report and not saved_report:
                    ctx.set_result(apply_report=run.report)
                    saved_report = True
                res = time_case(run, batch, steps, ROUNDS)
                images = res.pop("images").float()
                case.update(res)
                if name == "unpatched_eager":
                    ref[batch] = (case["latency_s"], images)
                elif batch in ref:
                    case["speedup_vs_unpatched_eager"] = ref[batch][0] / case["latency_s"]
                    case["max_abs_diff"] = (images - ref[batch][1]).abs().max().item()
            except Exception as e:  # a failed compile: record it and go on
                case.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            finally:
                if name.endswith("compile"):
                    torch._dynamo.reset()
        ctx.add_case(case)
        ctx.log(f"diffusers b{batch} {name}: {case['status']} "
             + (f"{case['images_per_s']:.4g} images/s, x{case.get('speedup_vs_unpatched_eager', 1):.2f} "
                f"(warm-up {case['warmup_s']:.1f} s)" if case["status"] == "ok" else case.get("reason", "")[:120]))


# ---------------------------------------------------------------------------------------------------------------------
# The pytest-benchmark suite (collected only when asked for: `pytest benchmarks/bench_diffusers.py`)
# ---------------------------------------------------------------------------------------------------------------------


def pytest_generate_tests(metafunc):
    if "diffusers_case" not in metafunc.fixturenames:
        return
    from benchmarks.conftest import bench_options

    o = bench_options(metafunc.config)
    cases = [(b, p) for b in o.batches for p in PROVIDERS]
    metafunc.parametrize("diffusers_case", cases, ids=[f"dit-b{b}-{p}" for b, p in cases])


def test_diffusers_dit(benchmark, bench, diffusers_case):
    import pytest
    import torch

    missing = diffusers_missing()
    if missing:
        pytest.skip(missing)

    from benchmarks._common import env_info

    batch, provider = diffusers_case
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    pipe = build_pipe(bench.tiny, dtype)
    run, backend = make_provider(provider, pipe, bench.tiny)
    benchmark.group = f"diffusers/dit/b{batch}"
    warm: list[float] = []
    times: list[float] = []
    try:
        timed(run, batch, min(3, bench.steps), warm)  # compile / autotune; pytest-benchmark times the calls below
        benchmark.pedantic(timed, args=(run, batch, bench.steps, times), rounds=bench.rounds or 1, warmup_rounds=0,
                           iterations=1)
    finally:
        if provider.endswith("compile"):
            torch._dynamo.reset()
    latency = statistics.median(times)
    benchmark.extra_info.update(
        kind="diffusers", op="dit_pipeline", model="dit-tiny" if bench.tiny else "dit-xl-2-256", batch=batch,
        steps=bench.steps, guidance_scale=GUIDANCE, provider=provider, mode="sample", backend=backend, dtype=dtype,
        tiny=bench.tiny, timer="perf_counter+sync", latency_s=latency, latency_all_s=times,
        images_per_s=batch / latency, warmup_s=warm[0], **env_info(),
    )


# ---------------------------------------------------------------------------------------------------------------------
# The README's table from a GPU-check JSON: `python -m benchmarks.bench_diffusers gpu_check.json`
# ---------------------------------------------------------------------------------------------------------------------


def readme_table(data: dict) -> str:
    """Markdown rows of the `diffusers` stage of a GPU-check result (every number read from `data`)."""
    st = data.get("stages", {}).get("diffusers")
    if not st:
        return "no diffusers stage in this file"
    env, res = data.get("env", {}), st.get("results", {})
    head = (f"{res.get('model')} `DiTPipeline`, {res.get('steps')} steps, {res.get('dtype')}, diffusers "
            f"{res.get('diffusers')}, on {env.get('device_name', '?')} (torch {env.get('torch', '?')}); "
            f"stage {st.get('status')} in {st.get('wall_s')} s" + (" **(CPU smoke: not a result)**"
                                                                 if data.get("smoke") else ""))
    if res.get("skipped"):
        return head + f"\n\nskipped: {res.get('note')}"
    rows = ["| batch | provider | images/s | speed-up vs unpatched eager | warm-up s | max pixel diff |",
            "|---|---|---|---|---|---|"]
    for c in st.get("cases", []):
        if c.get("status") != "ok":
            rows.append(f"| {c.get('batch')} | {c.get('provider')} | {c.get('status')}: {c.get('reason', '')} | | | |")
            continue
        rows.append(f"| {c['batch']} | {c['provider']} | {c['images_per_s']:.3g} | "
                    f"{c.get('speedup_vs_unpatched_eager', 1.0):.2f}x | {c['warmup_s']:.1f} | "
                    f"{c.get('max_abs_diff', 0.0):.2g} |")
    return head + "\n\n" + "\n".join(rows)


if __name__ == "__main__":
    import json
    import sys

    print(readme_table(json.loads(open(sys.argv[1]).read())))
