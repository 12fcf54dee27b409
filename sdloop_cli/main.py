"""``sdloop``: the command line that wires the stages. It parses, calls the stage, and turns the stage's own
errors into one clear line and an exit code; the work itself lives in the stage packages.

The commands live beside this module by what they drive (``data``, ``train``, ``evaluation``, ``models``, ``monitor``,
``retrain``, ``keys``, ``demo``); this package is the only one that imports the stages, and no other package imports
it. Two-word actions with options of their own (``review summary``, ``retrain history``) have their own parsers
(``TWO_WORD``), so their --help is theirs; every option that has a default value says it in --help.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

from sdloop_cli import data, demo, evaluation, keys, models, monitor, retrain, train
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
    for module in (data, train, evaluation, models):
        module.add_parsers(sub, parser)
    monitor.add_parsers(sub, parser)
    for module in (retrain, keys, demo):
        module.add_parsers(sub, parser)
    _show_defaults(parser)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option whose default is a value says it in --help: '(default X)' is added where the text does not
    already name a default. Options that default to None or False say theirs in their own words (or have none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                _show_defaults(sub)
            continue
        default = action.default
        if (isinstance(action, argparse._AppendAction) and default is None and action.help
                and "default" not in action.help):
            action.help += " (default: none)" if "repeatable" in action.help else " (repeatable; default: none)"
            continue
        if (not action.option_strings or action.help in (None, argparse.SUPPRESS) or default is None
                or isinstance(default, bool) or default == argparse.SUPPRESS or "default" in action.help):
            continue
        action.help += f" (default {default})".replace("%", "%%")


# two-word commands whose second word is an action with options of its own: parsed by their own parser, so
# `sdloop review summary --help` shows that action's usage, not its parent's
TWO_WORD: dict[tuple[str, str], Callable[[], argparse.ArgumentParser]] = {
    ("review", "summary"): evaluation.summary_parser,
    ("retrain", "history"): retrain.history_parser,
}


# commands whose work is torch on the CPU: they run on the free cores (sdloop/threads.py; SDLOOP_CPU_THREADS to
# choose), since a thread waiting for a core that other work holds stalls every step (demo and pretrain choose theirs)
TORCH_COMMANDS = {"train", "tune", "eval", "review", "retrain"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    _env_defaults()
    argv = list(sys.argv[1:] if argv is None else argv)
    own = TWO_WORD.get(tuple(argv[:2]))  # type: ignore[call-overload]
    if own is not None:
        args = own().parse_args(argv[2:])
        args.command = argv[0]
    else:
        args = build_parser().parse_args(argv)
    func: Optional[Callable[[argparse.Namespace], int]] = getattr(args, "func", None)
    if func is None:  # `sdloop`, `sdloop base`, `sdloop data` without an action: that level's help, exit 2
        groups: dict[str, argparse.ArgumentParser] = getattr(args, "group_parsers", {})
        (groups.get(args.command) or build_parser()).print_help(sys.stderr)
        return 2
    try:
        if args.command in TORCH_COMMANDS and getattr(args, "threads", None) is None:
            from sdloop.threads import apply_threads

            apply_threads()
        return func(args)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        again = {"tune": "the next `sdloop tune` with the same --output retries the interrupted trial from its "
                         "last checkpoint", "train": "continue the run from its last checkpoint with --resume"}
        if args.command == "base" and getattr(args, "base_command", None) == "pretrain":
            again["base"] = (f"`sdloop base pretrain {args.out_dir} --resume` continues from its last checkpoint "
                             "with the same step totals (before the first one it says so and starts over)")
        print(f"\ninterrupted; {again.get(args.command, 'nothing was left half-written')}.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
