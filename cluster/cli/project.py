"""`rayft init`, `rayft tiny-model` and `rayft quickstart`: starting a project, and the tiny model that tests and the
quickstart use because these machines cannot download weights."""
from __future__ import annotations

from pathlib import Path

from .errors import UserError

STARTER_CONFIG = "rayft.yaml"
SAMPLE_DATA = ("support_qa.json", "chats.csv", "kb.jsonl", "README.md")


def add_init(sub, command) -> None:
    p = sub.add_parser("init", help=command.help)
    p.add_argument("dir", help="the project folder to write (created if missing)")
    p.add_argument("--force", action="store_true", help="overwrite files that already exist there")
    p.set_defaults(fn=cmd_init)


def add_tiny_model(sub, command) -> None:
    tm = sub.add_parser("tiny-model", help=command.help)
    tm.add_argument("dir")
    tm.add_argument("--corpus", nargs="*", help="text files to train the tokenizer on (default: the sample data)")
    tm.add_argument("--vocab-size", type=int, default=1024)
    tm.add_argument("--hidden-size", type=int, default=128,
                    help="model width, a multiple of 64 (heads of 64); the default 128-wide model's random output head "
                         "keeps its logits within about +-2.6, a 256-wide one learns more within a few hundred steps")
    tm.set_defaults(fn=cmd_tiny_model)


def add_quickstart(sub, command) -> None:
    qs = sub.add_parser("quickstart", help=command.help)
    qs.add_argument("--workdir", default="runs", help="where the tiny model (DIR/tiny-model), the runs and the registry go")
    qs.add_argument("--port", type=int, help="HTTP port to serve on (default: a free loopback port)")
    qs.set_defaults(fn=cmd_quickstart)


def starter_files() -> dict[str, bytes]:
    """What `rayft init` writes, relative to the project folder: the quickstart config (its data paths made relative
    to the project), the sample data and cluster.yaml, all read from the installed package."""
    from importlib.resources import files

    examples = files("rayft.examples")
    config = examples.joinpath("quickstart.yaml").read_text(encoding="utf-8")
    config = config.replace("examples/data/", "data/").replace(
        "# The quickstart: a tiny Llama", "# A starter project (rayft init), the quickstart's settings: a tiny Llama")
    out = {STARTER_CONFIG: config.encode()}
    for name in SAMPLE_DATA:
        out[f"data/{name}"] = examples.joinpath("data", name).read_bytes()
    out["cluster.yaml"] = files("rayft.cluster").joinpath("cluster.yaml").read_bytes()
    return out


def cmd_init(args) -> int:
    root = Path(args.dir)
    planned = starter_files()
    clash = [rel for rel in planned if (root / rel).exists()]
    if clash and not args.force:
        raise UserError(f"{args.dir}: {', '.join(clash)} already exist(s); choose an empty folder, or add --force to "
                        "overwrite them")
    for rel, content in planned.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    print(f"wrote a starter project to {root}: {STARTER_CONFIG}, data/ ({len(SAMPLE_DATA) - 1} sample sources), "
          "cluster.yaml")
    print("next (paths in the config are relative to the project folder):")
    print(f"  cd {args.dir}")
    print(f"  rayft config validate {STARTER_CONFIG}")
    print("  rayft tiny-model runs/tiny-model        # the model the config names (or set model.name_or_path)")
    print(f"  rayft plan {STARTER_CONFIG}               # memory and the cluster.yaml worker type that fits")
    print(f"  rayft run {STARTER_CONFIG}                # data, tune, merge, register (add --serve to serve it)")
    return 0


def cmd_tiny_model(args) -> int:
    from rayft.train.tiny_model import TINY_HEAD_DIM, build_tiny_model

    files = args.corpus or None
    if args.hidden_size <= 0 or args.hidden_size % TINY_HEAD_DIM:
        raise UserError(f"--hidden-size {args.hidden_size}: must be a positive multiple of {TINY_HEAD_DIM} (the head "
                        "size vLLM's CPU attention needs), for example 128 (the default) or 256")
    out = build_tiny_model(args.dir, corpus_files=files, vocab_size=args.vocab_size, hidden_size=args.hidden_size)
    print(f"tiny Llama and tokenizer written to {out}")
    print(f"use it with: model: {{name_or_path: {out}}}")
    return 0


def cmd_quickstart(args) -> int:
    """Tiny model, `rayft run examples/quickstart.yaml` (tune, merge, register, promote), serve, one chat request."""
    from ..quickstart import run_quickstart

    return run_quickstart(args.workdir, port=args.port)
