"""`rayft data prepare|inspect`: the data stage on its own (Parquet, rejects, report) and what the model sees."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

from .common import load_args_config, with_file


def add_data(sub, command) -> None:
    data = sub.add_parser("data", help=command.help).add_subparsers(dest="action", required=True, metavar="ACTION")
    dp = with_file(data.add_parser("prepare", help="run the data pipeline; write Parquet, rejects and report"))
    dp.add_argument("--out", help="output folder (default: <storage_path>/<name>/data)")
    dp.set_defaults(fn=cmd_data_prepare)
    di = with_file(data.add_parser("inspect", help="print rendered examples with the trained-on spans marked"))
    di.add_argument("-n", type=int, default=3, help="how many examples")
    di.add_argument("--no-color", action="store_true", help="mark spans with [[ ]] even on a terminal")
    di.set_defaults(fn=cmd_data_inspect)


def tokenizer_spec(cfg):
    from rayft.data.pipeline import TokenizerSpec

    return TokenizerSpec(cfg.model.tokenizer_name_or_path, cfg.model.revision, cfg.model.trust_remote_code)


def run_data_prepare(cfg, out_dir: Optional[str], log=print):
    """Prepare the data of a config (Ray must be connected); writes outputs when out_dir is given."""
    from rayft.data.pipeline import format_report, prepare

    prepared = prepare(cfg.data, tokenizer_spec(cfg), log=log)
    if out_dir:
        write_prepared(prepared, out_dir)
    log(format_report(prepared.report))
    return prepared


def write_prepared(prepared, out_dir: str) -> None:
    """Train/eval Parquet, rejects.jsonl and report.json under out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train", "eval"):
        target = out / name
        if target.exists():
            import shutil

            shutil.rmtree(target)
    prepared.train.write_parquet(str((out / "train").resolve()))
    if prepared.eval is not None:
        prepared.eval.write_parquet(str((out / "eval").resolve()))
    from rayft.data.pipeline import write_rejects

    n = write_rejects(prepared.rejects, str(out / "rejects.jsonl"))
    report = dict(prepared.report)
    report["outputs"] = {"train": str(out / "train"), "eval": str(out / "eval") if prepared.eval is not None else None,
                         "rejects": str(out / "rejects.jsonl"), "rejects_rows": n}
    with open(out / "report.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {out}/train, {out}/eval, {out}/rejects.jsonl ({n} rows), {out}/report.json")


def cmd_data_prepare(args) -> int:
    from ..ray_conn import connect

    cfg = load_args_config(args)
    print(connect(cfg.ray.address, cfg.ray.num_cpus))
    out_dir = args.out or os.path.join(cfg.run_dir, "data")
    run_data_prepare(cfg, out_dir)
    return 0


def cmd_data_inspect(args) -> int:
    from rayft.data.inspect import inspect_examples

    cfg = load_args_config(args)
    color = sys.stdout.isatty() and not args.no_color
    print(inspect_examples(cfg.data, tokenizer_spec(cfg), args.n, color=color))
    return 0
