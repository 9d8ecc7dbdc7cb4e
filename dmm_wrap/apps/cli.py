"""`dmm-wrap`: fit and evaluate DeepMinMax from a YAML run file.

    dmm-wrap fit CONFIG [--output-dir DIR] [--max-steps N] [--resume | --overwrite] [--device D] [--set KEY=VALUE ...]
    torchrun --nproc-per-node N -m dmm_wrap fit CONFIG ...      (data-parallel; the same with --no-python dmm-wrap)
    dmm-wrap eval MODEL_DIR CONFIG [--output-dir DIR] [--device D] [--set KEY=VALUE ...]
    dmm-wrap audit MODEL CONFIG [--output-dir DIR] [--device D] [--set KEY=VALUE ...]
    dmm-wrap sweep CONFIG KEY=V1,V2,... [--output-dir DIR] [--max-steps N] [--device D] [--set KEY=VALUE ...]
    dmm-wrap push OUTPUT_DIR REPO_ID [--private] [--token-stdin] [--revision BRANCH] [--create-pr]

Every option is a config key (`--max-steps 5` is `--set fit.max_steps=5`; see `run_config.OPTION_KEYS`). A run
writes, under output_dir: metrics.json, report.md, tsne.png, training_curves.png, history.json, config.yaml (the
resolved config), model/ (save_pretrained) and checkpoints/ (SIGINT / SIGTERM write one and stop with status
128 + signal; `--resume` continues; a new run into a folder that holds checkpoints needs `--overwrite`). Text outputs
are written atomically, and metrics.json records the sha256 of the weights it evaluated. Under torchrun only rank 0
writes, evaluates and prints. `audit` writes audit.json and audit.md (into the model folder itself unless
--output-dir is given, so that its card shows the audit); `sweep` runs `fit` once per value, each in
OUTPUT_DIR/KEY=VALUE, and writes sweep.json and sweep.png. User errors (`ConfigError`: a bad config value, a
missing file, data that does not fit the config) print one line to stderr and exit with status 2 (set
DMM_WRAP_TRACEBACK=1 to see the traceback instead); any other error is a bug and shows its traceback (status 1).

This module parses the command line; the commands are in `dmm_wrap.apps.commands`, and the loaders and the model they
build from a run config in `dmm_wrap.apps.build`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from ..config import ConfigError
from ..train.checkpoint import TrainingInterrupted
from ..version import __version__
from .build import RunData, build_data, build_model, run_preprocessing
from .commands import evaluate_run, fit_and_evaluate, run_audit, run_eval, run_fit, run_push, run_sweep

EXIT_ERROR = 2
"""Exit status of a run stopped by a user error (bad config, missing file), as argparse uses for bad arguments."""


# --------------------------------------------------------------------------- arguments
def _add_run_options(parser: argparse.ArgumentParser, max_steps: bool,
                     output_help: str = "folder of the outputs (config key output_dir)") -> None:
    parser.add_argument("config", help="YAML run file (see configs/)")
    parser.add_argument("--output-dir", metavar="DIR", help=output_help)
    if max_steps:
        parser.add_argument("--max-steps", type=int, metavar="N", help="stop training after N steps (fit.max_steps)")
        parser.add_argument("--resume", action="store_true", default=None,
                            help="continue from the newest checkpoint in OUTPUT_DIR/checkpoints (fit.resume)")
        parser.add_argument("--overwrite", action="store_true", default=None,
                            help="start a new run even though OUTPUT_DIR/checkpoints holds an earlier run's "
                                 "checkpoints, which are then removed (fit.overwrite_checkpoints)")
    parser.add_argument("--device", metavar="DEVICE", help="cpu, cuda, cuda:1, ... (fit.device)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set fit.lr=0.001 (repeatable)")


def _fit_arguments(parser: argparse.ArgumentParser) -> None:
    _add_run_options(parser, max_steps=True)


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="folder written by save_pretrained (e.g. OUTPUT/model)")
    _add_run_options(parser, max_steps=False)


def _audit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="folder written by save_pretrained (e.g. OUTPUT/model), or a Hub repo id")
    _add_run_options(parser, max_steps=False,
                     output_help="folder of audit.json and audit.md (default: MODEL itself when it is a folder, so "
                                 "that its model card shows the audit; else the config's output_dir)")


def _sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run file (see configs/)")
    parser.add_argument("sweep", metavar="KEY=V1,V2,...",
                        help="the config key to vary and its values, e.g. fit.lam=0.2,0.5,0.8 (or a YAML list: "
                             "'eval.mlp_hidden=[[64], [128, 128]]')")
    parser.add_argument("--output-dir", metavar="DIR",
                        help="folder of sweep.json and sweep.png, with one run folder KEY=VALUE per value")
    parser.add_argument("--max-steps", type=int, metavar="N", help="stop each training after N steps (fit.max_steps)")
    parser.add_argument("--device", metavar="DEVICE", help="cpu, cuda, cuda:1, ... (fit.device)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any other config key in every run, e.g. --set fit.epochs=10 (repeatable)")


def _push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir",
                        help="a run folder of `dmm-wrap fit` (its model/ is pushed) or a save_pretrained folder")
    parser.add_argument("repo_id", help="Hub repository, e.g. my-org/digits-debiased")
    parser.add_argument("--private", action="store_true", default=None, help="create the repository as private")
    parser.add_argument("--token-stdin", action="store_true",
                        help="read the Hub token from one line of stdin (default: HF_TOKEN or the stored login)")
    parser.add_argument("--token", nargs="?", const="", default=None, help=argparse.SUPPRESS)  # refused: see TOKEN_HELP
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--commit-message", default="Upload DeepMinMax debiased encoder")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")


class Command(NamedTuple):
    """One subcommand: its name, one-line help, how it adds its arguments, and what it runs (the exit status)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: list[Command] = [
    Command("fit", "train the heads on a frozen backbone, evaluate, and write the report", _fit_arguments, run_fit),
    Command("eval", "evaluate a saved model against raw features and LEACE", _eval_arguments, run_eval),
    Command("audit", "measure how well each attribute can still be decoded from a saved model's features",
            _audit_arguments, run_audit),
    Command("sweep", "fit and evaluate once per value of one key; plot task accuracy against leakage",
            _sweep_arguments, run_sweep),
    Command("push", "push a trained model (and its metrics) to the Hugging Face Hub", _push_arguments, run_push),
]
"""The subcommands, in --help order; a new one is one more entry."""


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    """The `dmm-wrap` argument parser: one subparser per command, whose `run` default is the command's function."""
    parser = argparse.ArgumentParser(prog="dmm-wrap", description="DeepMinMax debiasing of frozen vision backbones.")
    parser.add_argument("--version", action="version", version=f"dmm-wrap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `dmm-wrap` and `python -m dmm_wrap`; returns the exit status.

    Example:
        >>> main(["fit", "configs/synthetic_digits.yaml", "--max-steps", "5", "--output-dir", "/tmp/smoke"])
    """
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as err:  # the user's input; anything else is a bug, whose traceback must show
        if os.environ.get("DMM_WRAP_TRACEBACK"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"dmm-wrap: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except TrainingInterrupted as stop:
        if stop.rank == 0:  # the process group is already shut down here: ask the exception
            where = f"checkpoint {stop.checkpoint}" if stop.checkpoint else "the last checkpoint"
            print(f"dmm-wrap: interrupted at step {stop.step}; {where} holds the run. Continue it with the same "
                  "command and --resume.", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("dmm-wrap: interrupted", file=sys.stderr)
        return 130


__all__ = ["main", "build_parser", "COMMANDS", "Command", "EXIT_ERROR", "RunData", "build_data", "build_model",
           "run_preprocessing", "evaluate_run", "fit_and_evaluate"]
