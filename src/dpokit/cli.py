"""The `dpokit` command line.

Each command is a parser (built in `dpokit.commands`) and a `run(args) -> int` function in the module that does
the work, imported only when the command runs, so `--help` and input errors answer at once. A `UserError` prints
one line and exits with code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from dpokit import commands
from dpokit.errors import EXIT_USER_ERROR, RunStopped, UserError

PROG = "dpokit"

DESCRIPTION = """\
Align a language model with preferences through Direct Preference Optimization.

The workflow, one command per step:
  dpokit data inspect pairs.jsonl        look at preference data before spending compute on it
  dpokit generate --prompts p.jsonl ...  no pairs yet? sample answers and let a judge pick best and worst
  dpokit train config.yaml beta=0.1      DPO with LoRA or full fine-tuning
  dpokit eval / compare / vibe           did alignment work? reward accuracy, judged win rate, side by side
  dpokit merge / report                  ship the merged model; read the run as an HTML report
  dpokit demo                            all of it, offline on a CPU, with the built-in model
"""


class _Parser(argparse.ArgumentParser):
    """argparse's own input errors (an unknown flag, a missing argument, a value of the wrong type) as one line with
    exit code 2, like every other input error, in place of argparse's usage block followed by the error.

    Abbreviated flags are not accepted: a misspelt `--num-sample` is an error, not `--num-samples` by guess.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(PROG).strip()
        _say(f"{PROG}: error: {command + ': ' if command else ''}{message}; see `{self.prog} --help`")
        raise SystemExit(EXIT_USER_ERROR)


def run_config(args: argparse.Namespace) -> int:
    from dpokit import config, sft_config

    if not args.settings:
        print(sft_config.describe(), end="")
        return 0
    path, overrides = config.split_settings(args.settings)
    cfg = config.load_config(path, overrides)
    import yaml

    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from dpokit import __version__

    parser = _Parser(prog=PROG, description=DESCRIPTION, formatter_class=commands.formatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in commands.COMMANDS:
        add(sub)
    return parser


def _run_target(args: argparse.Namespace) -> int:
    from dpokit.distributed import owned_process_group

    module_name, func_name = args.target.split(":")
    with owned_process_group():  # a command run under torchrun or accelerate closes the group it opened
        return int(getattr(importlib.import_module(module_name), func_name)(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--debug` is accepted anywhere on the line, not only before the command
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] in (["train"], ["sft"], ["config"]) and not {"-h", "--help"} & set(argv[1:]):
        # settings may be TRL-style flags (`--beta 0.1`), which argparse would take for its own options
        args = parser.parse_args(argv[:1])
        args.settings = argv[1:]
    else:
        args = parser.parse_args(argv)
    args.debug = debug
    logging.basicConfig(level=logging.INFO if not debug else logging.DEBUG, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _run_target(args)
    except UserError as e:
        if debug:
            raise
        _say(f"{PROG}: error: {e}")
        return EXIT_USER_ERROR
    except RunStopped as e:
        if debug:
            raise
        _say(f"{PROG}: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        _say(f"{PROG}: interrupted")
        return 130


def run() -> None:
    """The `dpokit` program: `main` on the command line's arguments, then the process ends with its exit code
    (`dpokit.distributed.exit_process`)."""
    from dpokit.distributed import exit_process

    exit_process(main())


def _say(line: str) -> None:
    """The one line a failed run ends with, on stderr, once: every process of a launch fails alike and exits with
    the same code, but only the main process prints."""
    from dpokit.distributed import launch_rank

    if launch_rank() == 0:
        print(line, file=sys.stderr)


if __name__ == "__main__":
    run()
