import sys, time, json, torch
torch.set_num_threads(1)
from crossflow.digits.baselines import caption_accuracy
from crossflow.pipelines.caption import CaptionPipeline
pipe = CaptionPipeline.from_pretrained(sys.argv[1], sampler=sys.argv[2])
for spec in sys.argv[3:]:
    ns, g, st = spec.split(":")
    pipe.noise_scale = float(ns)
    t = time.time()
    res = caption_accuracy(lambda images: pipe(images, 1, seed=0, guidance_scale=float(g), steps=int(st)), shifts=(2,))
    print(sys.argv[1], sys.argv[2], spec, {k: round(v, 4) for k, v in res.items() if k in ("clean", "shift1", "shift2")}, f"{time.time()-t:.0f}s", flush=True)
