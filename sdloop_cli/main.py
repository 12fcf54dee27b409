"""``sdloop``: the command line that wires the stages. It parses, calls the stage, and turns the stage's own
errors into one clear line and an exit code; the work itself lives in the stage packages.

The commands live beside this module by what they drive (``data``, ``train``, ``evaluation``, ``models``, ``monitor``,
``keys``, ``demo``); this package is the only one that imports the stages, and no other package imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

from sdloop_cli import data, demo, evaluation, keys, models, monitor, train
from sdloop_cli.train import build_train_config  # noqa: F401 - re-exported: part of the CLI API
from sdloop.errors import UserError, one_line


def _env_defaults() -> None:
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdloop", description=(
        "From a folder of images to a fine-tuned Stable Diffusion model in production: check data, train, search, "
        "evaluate, export, serve, monitor and retrain. Every command works offline on local diffusers folders."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (data, train, evaluation, models, monitor, keys, demo):
        module.add_parsers(sub, parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    _env_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Optional[Callable[[argparse.Namespace], int]] = getattr(args, "func", None)
    if func is None:  # `sdloop`, `sdloop base`, `sdloop data` without an action: that level's help, exit 2
        groups: dict[str, argparse.ArgumentParser] = getattr(args, "group_parsers", {})
        (groups.get(args.command) or parser).print_help(sys.stderr)
        return 2
    try:
        return func(args)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        again = {"tune": "the next `sdloop tune` with the same --output retries the interrupted trial from its "
                         "last checkpoint", "train": "continue the run from its last checkpoint with --resume"}
        print(f"\ninterrupted; {again.get(args.command, 'nothing was left half-written')}.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
