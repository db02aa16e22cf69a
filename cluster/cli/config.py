"""`rayft config validate|show|reference`."""
from __future__ import annotations

from .common import load_args_config, with_file
from .errors import UserError


def add_config(sub, command) -> None:
    cfg = sub.add_parser("config", help=command.help).add_subparsers(dest="action", required=True, metavar="ACTION")
    with_file(cfg.add_parser("validate", help="exit 0 if the config is valid, else print what is wrong")).set_defaults(
        fn=cmd_config_validate)
    with_file(cfg.add_parser("show", help="print the config with every default filled in")).set_defaults(
        fn=cmd_config_show)
    ref = cfg.add_parser("reference", help="print every config field with its type, default and meaning (markdown)")
    ref.add_argument("--write", metavar="README", help="replace the generated block of this file instead of printing")
    ref.set_defaults(fn=cmd_config_reference)


def cmd_config_validate(args) -> int:
    cfg = load_args_config(args)
    print(f"{args.file}: valid (run {cfg.name!r}, {len(cfg.data.sources)} source(s), model {cfg.model.name_or_path})")
    return 0


def cmd_config_show(args) -> int:
    from ..config import dump_config

    print(dump_config(load_args_config(args)), end="")
    return 0


def cmd_config_reference(args) -> int:
    from ..reference import render_reference, write_into

    if args.write:
        try:
            changed = write_into(args.write)
        except (OSError, ValueError) as e:
            raise UserError(f"--write {args.write}: {e}") from None
        print(f"{args.write}: config reference {'updated' if changed else 'already up to date'}")
    else:
        print(render_reference(), end="")
    return 0
