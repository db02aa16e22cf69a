"""The `rayft` command line: one module per command group, built from the command table (`cluster/commands.py`).

    rayft init DIR                                   a starter project: config, sample data, cluster.yaml
    rayft config validate|show FILE [--set k=v ...] | rayft config reference [--write README.md]
    rayft tiny-model DIR
    rayft data prepare FILE [--out DIR] | rayft data inspect FILE [-n N]
    rayft quickstart [--workdir DIR] [--port N]
    rayft train FILE [--resume] | rayft tune FILE [--resume]
    rayft run FILE [--resume] [--serve [--port N]] [--promote POLICY]
    rayft models list|promote|rollback|delete NAME ...
    rayft export RUN --out DIR [--merge] [--checkpoint best|latest|PATH] [--register NAME]
    rayft serve FILE | rayft serve --model PATH|models:/NAME@champion [--adapter NAME=PATH ...]
    rayft plan FILE [--cluster cluster.yaml] [--json]
    rayft submit FILE [--address URL] [--no-wait] [--dry-run] -- train|tune|run|serve|data prepare [--set k=v ...]
    rayft jobs list | status ID | logs ID [--follow] | stop ID [--address URL]

Exit codes: 0 success, 2 a usage or config error (the message says what to fix), 1 anything else.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

from ..commands import COMMANDS
from .errors import EXIT_USAGE, UserError, user_errors

__all__ = ["EXIT_USAGE", "UserError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayft",
                                description="LoRA fine-tuning on Ray, from data to an OpenAI-compatible endpoint.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        module = importlib.import_module(f".{command.module}", __name__)
        getattr(module, "add_" + command.name.replace("-", "_"))(sub, command)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # progress lines reach `ray job logs` and pipes as they happen
        sys.stdout.reconfigure(line_buffering=True)
    try:
        return args.fn(args)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_USAGE)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
