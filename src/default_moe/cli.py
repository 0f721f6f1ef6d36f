"""`default-moe` command line: one sub-command per user path.

Each sub-command lives in its own module exposing `add_arguments(parser)` and `run(args)`; modules are imported
only when their command runs, so `default-moe --help` stays fast. Errors print one line and exit non-zero
(set DEFAULT_MOE_DEBUG=1 for the traceback). SIGTERM ends a command like an error, after its cleanup has run
(temporary files removed; `train` saves a checkpoint first), with exit status 143.
"""

import argparse
import importlib
import os
import signal
import sys

SIGTERM_EXIT = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class Terminated(BaseException):
    """Raised by SIGTERM in the main thread. Python's default SIGTERM handling exits at once, running no `finally`
    and no cleanup; as an exception (not an `Exception`, so nothing catches it by accident) the cleanup runs."""


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second SIGTERM must not interrupt the cleanup
    raise Terminated


COMMANDS = {
    "demo": ("default_moe.training.demo", "train tiny Default MoE and top-K models side by side, then generate"),
    "train": ("default_moe.training.cli", "train or fine-tune with transformers.Trainer"),
    "compare": ("default_moe.training.compare", "compare routing='default' with routing='topk' on any config/data"),
    "convert": ("default_moe.conversion.cli", "convert a Mixtral/OLMoE/FlexOlmo checkpoint or upcycle a dense one"),
    "export": ("default_moe.conversion.export_cli", "write a Default MoE checkpoint back as Mixtral or OLMoE"),
    "card": ("default_moe.cards", "write the README.md model card of a checkpoint folder"),
    "push": ("default_moe.hub", "upload a checkpoint folder to the Hugging Face Hub"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="default-moe", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Only the chosen command's module is imported (the others only contribute their help line).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        result = args._run(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("error: terminated by SIGTERM", file=sys.stderr)
        return SIGTERM_EXIT
    except Exception as error:  # one readable line instead of a traceback wall
        if os.environ.get("DEFAULT_MOE_DEBUG"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return getattr(error, "exit_code", 1)  # e.g. 143 for a training run stopped by SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
