"""Our import names beside the packages our dependencies bring: Hugging Face's `kernels` (required by transformers
5.25, also used by diffusers) must stay theirs, and transformers' BERT and diffusers must import in the same process as
`crossflow_kernels` and `crossflow`. Run in a fresh interpreter from a directory outside the checkout, with the
checkout on PYTHONPATH (the way a working directory, or a user's workaround, puts it first)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, pathlib, sys
repo = pathlib.Path(sys.argv[1])
import crossflow_kernels, crossflow
from transformers import BertModel
import diffusers
assert pathlib.Path(crossflow_kernels.__file__).resolve().parent == repo / "crossflow_kernels"
assert callable(crossflow_kernels.use_backend) and callable(crossflow.FastSampler)
spec = importlib.util.find_spec("kernels")
if spec is not None:  # Hugging Face's, where transformers requires it; never a module of this checkout
    import kernels
    assert not pathlib.Path(kernels.__file__).resolve().is_relative_to(repo), kernels.__file__
print("ok", spec is not None)
"""


def test_no_package_of_ours_is_named_kernels():
    assert not (REPO / "kernels").exists()
    setup = (REPO / "setup.py").read_text()
    assert '"kernels"' not in setup.split("packages=")[1].split("\n")[0]


def test_transformers_and_diffusers_import_beside_our_packages(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", PROBE, str(REPO)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]
