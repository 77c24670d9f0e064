"""`python -m crossflow.train ...`: the trainer's command line (the same parser as `crossflow train`; the Trainer is
`crossflow.training.train`). Parsing imports no torch, so `--help` answers at once."""

from __future__ import annotations

from typing import Any


def main(argv: list[str] | None = None, prog: str = "crossflow.train") -> list[dict[str, Any]]:
    from crossflow.training.train_config import parse_config

    tc = parse_config(argv, prog)
    from crossflow.training.train import run

    return run(tc, prog)


if __name__ == "__main__":
    main()
