import sys, torch
torch.set_num_threads(1)
from crossflow.pipelines.image import ImagePipeline
from crossflow.digits.data import load_native, downsample
from crossflow.digits.eval import psnr, predict, bicubic
from crossflow.digits.shift import shifted_set
pipe = ImagePipeline.from_pretrained(sys.argv[1], sampler="midpoint")
real, y = load_native("test")
xs, ys, _ = shifted_set(real, y, 1)
xs, ys = xs[::4], ys[::4]  # a quarter of the ring-1 set
low = downsample(xs)
single = pipe.images(low, seed=0, steps=8, guidance_scale=1.0)
mean = pipe.posterior_mean(low, 16, seed=0, steps=8, guidance_scale=1.0)
print(sys.argv[1], f"shift1 (n={len(ys)}): single {psnr(single, xs).mean():.2f} acc {(predict(single)==ys).double().mean():.3f}; mean16 {psnr(mean, xs).mean():.2f} acc {(predict(mean)==ys).double().mean():.3f}; bicubic {psnr(bicubic(low), xs).mean():.2f}; true acc {(predict(xs)==ys).double().mean():.3f}")
