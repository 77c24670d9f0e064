import sys, time, torch
torch.set_num_threads(1)
from crossflow.pipelines.image import ImagePipeline
from crossflow.digits.data import load_native, downsample
from crossflow.digits.eval import psnr, _realism, predict
ck = sys.argv[1]
pipe = ImagePipeline.from_pretrained(ck, sampler=sys.argv[2] if len(sys.argv)>2 else None)
real, y = load_native("test"); low = downsample(real)
for g in [float(x) for x in (sys.argv[3] if len(sys.argv)>3 else "1.0").split(",")]:
  for steps in [8]:
    t=time.time()
    N=32
    out = pipe.images(low, num_images_per_image=N, seed=0, steps=steps, guidance_scale=g).view(len(low), N, 1, 8, 8)
    single = out[:,0]; mean = out.mean(1)
    print(f"g={g} steps={steps} single {psnr(single,real).mean():.2f} mean{N} {psnr(mean,real).mean():.2f} mean16 {psnr(out[:,:16].mean(1),real).mean():.2f} mean4 {psnr(out[:,:4].mean(1),real).mean():.2f} acc {(predict(single)==y).double().mean():.3f} realism {_realism(single)} {time.time()-t:.0f}s", flush=True)
