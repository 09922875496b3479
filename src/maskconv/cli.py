"""Command line: ``maskconv <command>`` / ``python -m maskconv`` / ``torchrun -m maskconv``.

Parses arguments and runs the command's function; nothing else happens here. ``COMMANDS`` names every command
and its room (the module that declares its arguments and runs it, ``commands.Command``). Training flags are
generated from the config dataclasses (``--optim.blr 1e-4`` or ``optim.blr=1e-4``); precedence: defaults <
--recipe < flags and key=value overrides; one key given both as a flag and as key=value is an error.
"""
from __future__ import annotations

import argparse
import sys

from .commands import (ALIASES, UNUSED, Command, add_config_flags, config_from_args, field_docs,  # noqa: F401
                       recipe_names, task_keys)
from .data import scenes, shards, stats
from .heads import task as dense
from .pix2seq import task as pix2seq
from .tasks import classify, demo, export, pretrain, visualize, zoo
from .viz import roadmap

# Adding a command: a room that ends with ``COMMAND = Command(help, add_arguments, run)``, and one line here.
COMMANDS: dict[str, Command] = {
    "models": zoo.COMMAND,
    "pretrain": pretrain.COMMAND,
    "finetune": classify.FINETUNE,
    "linprobe": classify.LINPROBE,
    "eval": classify.EVAL,
    "visualize": visualize.COMMAND,
    "export": export.COMMAND,
    "roadmap": roadmap.COMMAND,
    "scenes": scenes.COMMAND,
    "shards": shards.COMMAND,
    "data": stats.COMMAND,
    "pix2seq": pix2seq.COMMAND,
    "detect": dense.DETECT,
    "segment": dense.SEGMENT,
    "demo": demo.COMMAND,
}


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maskconv", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.description))
    return p


def error_line(e: BaseException) -> str:
    """One line for a user-level error. An exception re-raised from a DataLoader worker carries the worker's
    whole traceback in its message ("Caught ValueError in DataLoader worker process 0. Original Traceback ...");
    keep only what the original exception said."""
    text = str(e)
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        name = f"{type(e).__name__}: "
        return (last[len(name):] if last.startswith(name) else last) + " (in a data loader worker)"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    # key=value overrides may stand anywhere among the flags: argparse takes one positional run, so collect
    # the rest from the unknown arguments (anything else unknown is still an error).
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    from .config import ConfigError
    from .engine.loop import Interrupted

    clean = False  # every rank got to the end without an error: safe to meet at a barrier before teardown
    try:
        status = COMMANDS[args.command].run(args) or 0
        clean = status == 0
        return status
    except Interrupted as e:  # Ctrl-C / SIGTERM: a checkpoint was saved
        print(f"maskconv: {e}", file=sys.stderr)
        return 128 + e.signum
    except RuntimeError as e:
        if "Timed out" not in str(e):  # a collective gave up on a stopped / hung process (run.dist_timeout_minutes)
            raise
        print(f"maskconv: error: another process did not answer within run.dist_timeout_minutes ({e})",
              file=sys.stderr)
        return 2
    except (ConfigError, ValueError, FileNotFoundError, FloatingPointError, ImportError) as e:  # one line, no traceback
        print(f"maskconv: error: {error_line(e)}", file=sys.stderr)
        return 2
    finally:
        from .engine.dist import teardown

        teardown(clean)


if __name__ == "__main__":
    raise SystemExit(main())
