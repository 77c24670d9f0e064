#!/bin/bash
# Record the CLI's outputs (pixels, captions, eval numbers) for fixed seeds; usage: behaviour.sh OUTDIR
set -u
OUT=$1; mkdir -p $OUT; cd $OUT
CF=/work/venv/bin/crossflow
export OMP_NUM_THREADS=1
B="--backend torch -q --device cpu"
$CF sample "a handwritten seven" "a handwritten zero" --n 3 --seed 3 $B -o s1.png 2>err_s1.txt
TRITON_INTERPRET=1 $CF sample "a handwritten two" --n 2 --steps 7 --guidance 3 --seed 1 --backend triton -q --device cpu -o s2.png 2>err_s2.txt
$CF interpolate "a handwritten one" "a handwritten seven" --frames 3 $B -o i1.png 2>err_i1.txt
$CF arithmetic "a handwritten seven" - "a handwritten one" + "a handwritten two" --n 3 $B -o a1.png 2>err_a1.txt
I=/work/notes/beh; $CF caption $I/in16_3.png $I/in16_17.png $I/in8_42.png --n 2 $B > c1.txt 2>err_c1.txt
$CF caption $I/in16_17.png --steps 5 --guidance 2 --seed 4 $B > c2.txt 2>err_c2.txt
$CF upscale $I/in4_3.png $I/in4_17.png --n 2 $B -o u1.png 2>err_u1.txt
$CF vary $I/in8_42.png $I/in8_3.png --n 3 $B -o v1.png 2>err_v1.txt
$CF vary --text "a handwritten seven" --n 3 $B > v2.txt 2>err_v2.txt
for p in digits digits-caption digits-sr digits-vary; do
  $CF eval --preset $p --json e_$p.json $B --per-prompt 2 --per-image 2 > e_$p.txt 2>err_e_$p.txt
done
/work/venv/bin/python - <<'PY'
import glob, hashlib, json
from PIL import Image
import numpy as np
for f in sorted(glob.glob("*")):
    if f.endswith(".png"):
        a = np.asarray(Image.open(f)); print(f, a.shape, hashlib.sha256(a.tobytes()).hexdigest()[:16])
    elif f.endswith(".json"):
        d = json.load(open(f))
        def strip(o):
            if isinstance(o, dict): return {k: strip(v) for k, v in o.items() if not any(s in k for s in ("second", "time", "elapsed", "_s"))}
            if isinstance(o, list): return [strip(v) for v in o]
            return o
        print(f, json.dumps(strip(d), sort_keys=True)[:3000])
    elif f.endswith(".txt") and not f.startswith("err"):
        print(f, repr(open(f).read()[:2000]))
PY
