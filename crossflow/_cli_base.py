"""The argparse classes every `crossflow` verb's parser uses (standard library only, so that `crossflow --help` stays
instant, and importable by `crossflow.training.train` without importing the CLI)."""

from __future__ import annotations

import argparse


class UsageError(ValueError):
    """An option this command cannot honour, found after parsing (e.g. --device cuda on a machine without CUDA):
    reported like a parser error, one line and exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (prefix `crossflow: error:`, a pointer to --help) and exit status 2."""

    error_prefix = "crossflow"  # `crossflow train` names its own prog, as its runtime errors do

    def error(self, message: str):
        self.exit(2, f"{self.error_prefix}: error: {message} (see `{self.prog} --help`)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default, except None and flags, whose help text says what they mean."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)
