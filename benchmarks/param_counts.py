"""Parameter counts of every preset (flow network, Text VE, contrastive image encoder), built on the meta device.

    python -m benchmarks.param_counts [--out benchmarks/results/param_counts.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def counts() -> dict[str, dict[str, int]]:
    from crossflow import CONFIGS, CrossFlow, CrossFlowConfig

    out = {}
    for name in CONFIGS:
        with torch.device("meta"):  # no allocation: dit-h-2-512 has over a billion parameters
            m = CrossFlow(CrossFlowConfig.from_name(name))
        out[name] = {part: sum(p.numel() for p in getattr(m, part).parameters())
                     for part in ("flow", "text_ve", "image_encoder")}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/param_counts.json")
    args = p.parse_args(argv)
    from crossflow.checkpoint import atomic_write

    text = json.dumps(counts(), indent=2) + "\n"
    atomic_write(args.out, lambda f: Path(f).write_text(text))
    print(text, end="")


if __name__ == "__main__":
    main()
