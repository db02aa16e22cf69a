"""Helpers the command modules share: loading the config named on the command line."""
from __future__ import annotations


def load_args_config(args):
    """The config FILE of a command, with its `--set` overrides applied (validated: a ConfigError names the field)."""
    from rayft.data.storage import apply_storage_settings

    from ..config import load_config

    cfg = load_config(args.file, args.set or [])
    apply_storage_settings(cfg.storage)  # one endpoint for Ray Train, Ray Data, MLflow artifacts, export, serving
    return cfg


def with_file(sp):
    """The FILE argument and `--set` overrides of every command that runs on a config."""
    sp.add_argument("file", help="the run's YAML config")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a field, e.g. --set data.max_seq_length=1024 (repeatable)")
    return sp
