import json, torch
torch.set_num_threads(1)
from crossflow.pipelines.text_to_image import CrossFlowPipeline
from crossflow.sampling import latent_arithmetic
from crossflow.digits.eval import train_classifier
pipe = CrossFlowPipeline.from_pretrained("/work/main/crossflow/weights/digits")
lat = lambda p: pipe.encode_prompts(p, 8, generator=torch.Generator().manual_seed(0))
z0 = latent_arithmetic(lat("number seven, written by hand"), lat("three"), lat("seven"))
imgs = pipe(z0=z0, output_type="pt").float() * 2 - 1
clf, _ = train_classifier()
pred = clf.predict(imgs.clamp(-1, 1).flatten(1).numpy()).tolist()
res = {"command": 'crossflow arithmetic "number seven, written by hand" - "seven" + "three" --n 8 --seed 0 (the same z0 and sampler, replayed in Python: benchmarks/results/2026-12-07_retrain-scripts/arith.py)',
       "checkpoint": "crossflow/weights/digits", "sampling": pipe.sampling, "classifier_labels": pred, "threes": sum(p == 3 for p in pred)}
print(res)
json.dump(res, open("/work/main/benchmarks/results/2026-12-07_cpu_digits-arithmetic.json", "w"), indent=1)
