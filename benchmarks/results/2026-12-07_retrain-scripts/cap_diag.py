import sys, time, json, torch
torch.set_num_threads(1)
from crossflow.digits.baselines import caption_accuracy
from crossflow.pipelines.caption import CaptionPipeline
pipe = CaptionPipeline.from_pretrained(sys.argv[1])
kw = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
t = time.time()
res = caption_accuracy(lambda images: pipe(images, 1, seed=0, **kw))
print(sys.argv[1], kw, {k: round(v, 4) for k, v in res.items() if k in ("clean", "shift1", "shift2")}, f"{time.time()-t:.0f}s")
