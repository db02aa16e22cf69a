"""The `rayft` command line.

    rayft config validate FILE [--set k=v ...]
    rayft config show FILE [--set k=v ...]
    rayft config reference [--write README.md]
    rayft tiny-model DIR
    rayft data prepare FILE [--out DIR] [--set k=v ...]
    rayft data inspect FILE [-n N] [--set k=v ...]
    rayft quickstart [--workdir DIR] [--port N]
    rayft train FILE [--resume] [--set k=v ...]
    rayft tune FILE [--resume] [--set k=v ...]
    rayft run FILE [--resume] [--serve [--port N]] [--promote POLICY] [--set k=v ...]
    rayft models list|promote|rollback NAME ...
    rayft export RUN --out DIR [--merge] [--checkpoint best|latest|PATH] [--register NAME]
    rayft serve FILE [--set k=v ...] | rayft serve --model PATH|models:/NAME@champion [--adapter NAME=PATH ...]

    rayft plan FILE [--cluster cluster.yaml] [--json] [--set k=v ...]
    rayft submit FILE [--address URL] [--no-wait] -- train|tune|run|serve|data prepare [--set k=v ...]
    rayft jobs list | status ID | logs ID [--follow] | stop ID [--address URL]

Exit codes: 0 success, 2 a usage or config error (the message says what to fix), 1 anything else.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

EXIT_USAGE = 2


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def _load(args):
    from ..config import load_config

    return load_config(args.file, args.set or [])


def cmd_config_validate(args) -> int:
    cfg = _load(args)
    print(f"{args.file}: valid (run {cfg.name!r}, {len(cfg.data.sources)} source(s), model {cfg.model.name_or_path})")
    return 0


def cmd_config_show(args) -> int:
    from ..config import dump_config

    print(dump_config(_load(args)), end="")
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


def cmd_tiny_model(args) -> int:
    from rayft.train.tiny_model import build_tiny_model

    files = args.corpus or None
    out = build_tiny_model(args.dir, corpus_files=files, vocab_size=args.vocab_size)
    print(f"tiny Llama and tokenizer written to {out}")
    print(f"use it with: model: {{name_or_path: {out}}}")
    return 0


def _tokenizer_spec(cfg):
    from rayft.data.pipeline import TokenizerSpec

    return TokenizerSpec(cfg.model.tokenizer_name_or_path, cfg.model.revision, cfg.model.trust_remote_code)


def run_data_prepare(cfg, out_dir: Optional[str], log=print):
    """Prepare the data of a config (Ray must be connected); writes outputs when out_dir is given."""
    from rayft.data.pipeline import format_report, prepare

    prepared = prepare(cfg.data, _tokenizer_spec(cfg), log=log)
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

    cfg = _load(args)
    print(connect(cfg.ray.address, cfg.ray.num_cpus))
    out_dir = args.out or os.path.join(cfg.run_dir, "data")
    run_data_prepare(cfg, out_dir)
    return 0


def cmd_data_inspect(args) -> int:
    from rayft.data.inspect import inspect_examples

    cfg = _load(args)
    color = sys.stdout.isatty() and not args.no_color
    print(inspect_examples(cfg.data, _tokenizer_spec(cfg), args.n, color=color))
    return 0


def cmd_quickstart(args) -> int:
    """Tiny model, `rayft run examples/quickstart.yaml` (tune, merge, register, promote), serve, one chat request."""
    from rayft.train.trainer import USER_ERRORS

    from ..quickstart import run_quickstart

    try:
        return run_quickstart(args.workdir, port=args.port)
    except USER_ERRORS as e:
        raise UserError(str(e)) from None


def cmd_train(args) -> int:
    """Prepare the data, train on Ray (DeepSpeed + LoRA), track in MLflow, register the adapter."""
    from rayft.train.trainer import USER_ERRORS, check_before_start, run_training

    from ..access import require
    from ..ray_conn import connect

    cfg = _load(args)
    require(cfg, "train", f"run {cfg.name} (model {cfg.model.name_or_path})")
    try:
        check_before_start(cfg.model, cfg.train)  # config mistakes surface before Ray starts
        print(connect(cfg.ray.address, cfg.ray.num_cpus))
        out = run_training(cfg, resume=args.resume)
    except USER_ERRORS as e:
        raise UserError(str(e)) from None
    m = out.metrics
    summary = [f"finished {m.get('global_step')}/{m.get('total_steps')} steps"]
    if m.get("eval_loss") is not None:
        summary.append(f"eval loss {m['eval_loss']:.4f} (before training {m.get('initial_eval_loss') or float('nan'):.4f})")
    print(", ".join(summary))
    print(f"run folder: {out.run_dir}")
    print(f"adapter: {out.adapter_dir}")
    if out.mlflow_run_id:
        print(f"MLflow run {out.mlflow_run_id} ({out.tracking_uri})")
    print(f"next: rayft export {out.run_dir} --out {out.run_dir}/export --merge")
    return 0


def cmd_tune(args) -> int:
    """Search LoRA/optimizer settings with Ray Tune + ASHA, then export, register and promote the best."""
    from rayft.train.trainer import USER_ERRORS, check_before_start
    from rayft.tune.search import run_search
    from rayft.tune.space import SearchSpaceError

    from ..access import require
    from ..ray_conn import connect

    cfg = _load(args)
    if cfg.tune is None:
        raise UserError(f"{args.file}: no `tune:` section; add one with a search_space (see examples/quickstart.yaml)")
    require(cfg, "tune", f"search {cfg.name} (model {cfg.model.name_or_path})")
    if cfg.tracking.enabled and cfg.tune.promotion.policy != "never":  # the search may crown a champion at its end
        name = cfg.tracking.register_model if cfg.tracking.register_model is not None else cfg.name
        require(cfg, "promote", f"models:/{name}@champion")
    try:
        check_before_start(cfg.model, cfg.train)  # the search space was checked when the config loaded
        print(connect(cfg.ray.address, cfg.ray.num_cpus))
        out = run_search(cfg, resume=args.resume)
    except SearchSpaceError as e:
        raise UserError(str(e)) from None
    except USER_ERRORS as e:
        raise UserError(str(e)) from None
    print(f"search folder: {out.search_dir}")
    if out.merged_dir:
        print(f"merged best model: {out.merged_dir}")
    for note in out.notes:
        print(note)
    return 0


def cmd_run(args) -> int:
    """The whole pipeline: data -> tune (or train) -> export + merge -> register + promote -> optionally serve."""
    from rayft.train.trainer import USER_ERRORS, check_before_start
    from rayft.tune.space import SearchSpaceError

    from ..access import require
    from ..pipeline import effective_promotion, run_pipeline, serve_stage, summary
    from ..ray_conn import connect

    cfg = _load(args)
    # Every action the pipeline will take is checked (and audited) before any of it starts.
    what = f"{'search' if cfg.tune is not None else 'run'} {cfg.name} (model {cfg.model.name_or_path})"
    require(cfg, "tune" if cfg.tune is not None else "train", what)
    name = cfg.tracking.register_model if cfg.tracking.register_model is not None else cfg.name
    if cfg.tracking.enabled and name and effective_promotion(cfg, args.promote).policy != "never":
        require(cfg, "promote", f"models:/{name}@champion")
    if args.serve:
        require(cfg, "deploy", f"models:/{name}@champion" if cfg.tracking.enabled and name else f"{cfg.name} merged")
    try:
        check_before_start(cfg.model, cfg.train)
        print(connect(cfg.ray.address, cfg.ray.num_cpus))
        out = run_pipeline(cfg, resume=args.resume, policy=args.promote)
    except (SearchSpaceError, *USER_ERRORS) as e:
        raise UserError(str(e)) from None
    scfg = serve_stage(cfg, out, args.serve, port=args.port)
    print(summary(out))
    if scfg is None:
        return 0
    from rayft.serve.app import run_server

    return run_server(scfg, scfg.model, out.tracking_uri, security=cfg.security)


def _registry_uri(args) -> str:
    if args.tracking_uri:
        return args.tracking_uri
    if args.file:
        from rayft.registry.tracking import tracking_uri

        cfg = _load(args)
        return tracking_uri(cfg.tracking.tracking_uri, cfg.storage_path)
    raise UserError("give the registry: --tracking-uri URI (for example sqlite:///runs/mlflow.db) or --config FILE")


def cmd_models(args) -> int:
    """The MLflow registry: list versions, promote one to an alias, roll an alias back, delete a version.
    Changes are checked against the access policy (cluster/access.py) and audited."""
    from rayft.registry.versions import RegistryError, delete_version, list_versions, promote, rollback

    from ..access import require

    uri = _registry_uri(args)
    security = _load(args).security if args.file else None  # None: defaults + RAYFT_POLICY_FILE / RAYFT_AUDIT_LOG
    if args.action == "promote":
        require(security, "promote", f"models:/{args.name}/{args.version}@{args.alias}")
    elif args.action == "rollback":
        require(security, "rollback", f"models:/{args.name}@{args.alias}")
    elif args.action == "delete":
        require(security, "delete", f"models:/{args.name}/{args.version}")
    try:
        if args.action == "list":
            versions = list_versions(uri, args.name)
            if not versions:
                raise UserError(f"no versions of model {args.name!r} in {uri}")
            for v in versions:
                tags = v["tags"]
                print(f"v{v['version']:<4} {','.join(v['aliases']) or '-':<22} kind={tags.get('kind', '?')} "
                      f"eval_loss={tags.get('eval_loss', '-')} base={tags.get('base_model', '-')}")
        elif args.action == "promote":
            before = promote(uri, args.name, args.version, args.alias)
            print(f"{args.name}@{args.alias} -> v{args.version}" + (f" (was v{before})" if before else ""))
        elif args.action == "delete":
            delete_version(uri, args.name, args.version)
            print(f"{args.name} v{args.version} deleted")
        else:
            was, now = rollback(uri, args.name, args.alias)
            print(f"{args.name}@{args.alias} rolled back: v{was} -> v{now}")
    except RegistryError as e:
        raise UserError(str(e)) from None
    return 0


def cmd_export(args) -> int:
    from rayft.security.artifacts import ArtifactError
    from rayft.security.config import SecurityConfig
    from rayft.train.export import ExportError, export_run
    from rayft.train.trainer import TrainingError, read_run_file

    from ..access import require

    try:
        if args.register:  # a new registry version, as `rayft train` registers its adapter: the `train` action
            security = SecurityConfig.model_validate(read_run_file(args.run)["config"].get("security") or {})
            require(security, "train", f"models:/{args.register} (new version from {args.run})")
        export_run(args.run, args.out, merge=args.merge, which=args.checkpoint, register=args.register)
    except (ExportError, TrainingError, ArtifactError) as e:
        raise UserError(str(e)) from None
    return 0


def cmd_serve(args) -> int:
    """An OpenAI-compatible endpoint on Ray Serve: the `serve:` section of FILE, or a model given by flags."""
    from pydantic import ValidationError

    from rayft.serve.config import ServeConfig

    from ..config import format_validation_error
    from ..ray_conn import connect

    if args.hash_key:  # read from stdin so the key stays out of shell history and `ps`
        from rayft.serve.auth import hash_key

        key = sys.stdin.readline().strip()
        if not key:
            raise UserError("--hash-key reads the key from stdin; pipe it in: rayft serve --hash-key < keyfile")
        print(hash_key(key))
        return 0
    flags = {k: v for k, v in (("host", args.host), ("port", args.port), ("api_keys_file", args.keys_file)) if v is not None}
    adapters = {}
    for item in args.adapter or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--adapter {item!r}: expected NAME=PATH, for example --adapter support=runs/support/export/adapter")
        adapters[name] = path
    address, num_cpus, tracking, security = None, None, args.tracking_uri, None
    if args.file:
        from rayft.registry.tracking import tracking_uri

        cfg = _load(args)
        security = cfg.security
        raw = cfg.serve.model_dump(exclude_unset=True)
        model = args.model or cfg.serve.model or cfg.model.name_or_path
        address, num_cpus = cfg.ray.address, cfg.ray.num_cpus
        tracking = tracking or tracking_uri(cfg.tracking.tracking_uri, cfg.storage_path)
    elif args.model:
        raw, model = {}, args.model
    else:
        raise UserError("give a config FILE or --model PATH (a merged model folder, hub id or models:/NAME@alias)")
    raw.update(flags, model=model)
    if adapters:
        raw["adapters"] = {**raw.get("adapters", {}), **adapters}
    try:
        scfg = ServeConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(e, args.file or "rayft serve", ServeConfig)) from None
    from ..access import require

    require(security, "deploy", f"{model}" + (f" with adapters {', '.join(sorted(scfg.adapters))}" if scfg.adapters else "")
            + f" on {scfg.host}:{scfg.port}")
    print(connect(address, num_cpus))
    from rayft.serve.app import run_server

    return run_server(scfg, model, tracking, smoke_test=args.smoke_test, security=security)


def cmd_plan(args) -> int:
    from ..cluster_yaml import ClusterYamlError
    from ..plan import PlanError, run_plan

    try:
        return run_plan(args)
    except (PlanError, ClusterYamlError) as e:
        raise UserError(str(e)) from None


def cmd_submit(args) -> int:
    from ..jobs import JobError, run_submit

    try:
        return run_submit(args)
    except JobError as e:
        raise UserError(str(e)) from None


def cmd_jobs(args) -> int:
    from ..jobs import JobError, run_jobs

    try:
        return run_jobs(args)
    except JobError as e:
        raise UserError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayft", description="LoRA fine-tuning on Ray, from data to an OpenAI-compatible endpoint.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_file(sp):
        sp.add_argument("file", help="the run's YAML config")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. --set data.max_seq_length=1024 (repeatable)")
        return sp

    cfg = sub.add_parser("config", help="check or print a config").add_subparsers(dest="action", required=True, metavar="ACTION")
    with_file(cfg.add_parser("validate", help="exit 0 if the config is valid, else print what is wrong")).set_defaults(fn=cmd_config_validate)
    with_file(cfg.add_parser("show", help="print the config with every default filled in")).set_defaults(fn=cmd_config_show)
    ref = cfg.add_parser("reference", help="print every config field with its type, default and meaning (markdown)")
    ref.add_argument("--write", metavar="README", help="replace the generated block of this file instead of printing")
    ref.set_defaults(fn=cmd_config_reference)

    tm = sub.add_parser("tiny-model", help="write a tiny Llama + tokenizer for tests and the quickstart")
    tm.add_argument("dir")
    tm.add_argument("--corpus", nargs="*", help="text files to train the tokenizer on (default: examples/data)")
    tm.add_argument("--vocab-size", type=int, default=1024)
    tm.set_defaults(fn=cmd_tiny_model)

    data = sub.add_parser("data", help="prepare or inspect the training data").add_subparsers(dest="action", required=True, metavar="ACTION")
    dp = with_file(data.add_parser("prepare", help="run the data pipeline; write Parquet, rejects and report"))
    dp.add_argument("--out", help="output folder (default: <storage_path>/<name>/data)")
    dp.set_defaults(fn=cmd_data_prepare)
    di = with_file(data.add_parser("inspect", help="print rendered examples with the trained-on spans marked"))
    di.add_argument("-n", type=int, default=3, help="how many examples")
    di.add_argument("--no-color", action="store_true", help="mark spans with [[ ]] even on a terminal")
    di.set_defaults(fn=cmd_data_inspect)

    qs = sub.add_parser("quickstart", help="tiny model + sample data: tune, merge, register, serve, one chat request")
    qs.add_argument("--workdir", default="runs", help="where the tiny model (DIR/tiny-model), the runs and the registry go")
    qs.add_argument("--port", type=int, help="HTTP port to serve on (default: a free loopback port)")
    qs.set_defaults(fn=cmd_quickstart)

    tr = with_file(sub.add_parser("train", help="LoRA fine-tuning on Ray Train with DeepSpeed; resumes a stopped run"))
    tr.add_argument("--resume", action="store_true",
                    help="continue from the run's last intact checkpoint; an error if there is none "
                    "(without it, re-running the same config also continues)")
    tr.set_defaults(fn=cmd_train)
    tu = with_file(sub.add_parser("tune", help="Ray Tune search (ASHA) over training; crowns the best as champion"))
    tu.add_argument("--resume", action="store_true", help="continue an interrupted search; finished trials are kept")
    tu.set_defaults(fn=cmd_tune)

    rn = with_file(sub.add_parser("run", help="the whole pipeline: data, tune (or train), export + merge, register + promote, serve"))
    rn.add_argument("--resume", action="store_true", help="continue an interrupted training run or search")
    rn.add_argument("--serve", action="store_true", help="then serve the champion until interrupted (Ctrl-C)")
    rn.add_argument("--port", type=int, help="with --serve: HTTP port (default: serve.port of the config)")
    rn.add_argument("--promote", choices=["better_eval_loss", "always", "never"],
                    help="promotion policy for the new version (default: tune.promotion.policy, else better_eval_loss)")
    rn.set_defaults(fn=cmd_run)

    mo = sub.add_parser("models", help="the model registry: list, promote, rollback, delete").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    for action, helptext in (("list", "versions with their aliases and eval loss"),
                             ("promote", "point an alias (default champion) at a version"),
                             ("rollback", "move an alias back to the version it had before"),
                             ("delete", "delete a version that no alias points at")):
        mp = mo.add_parser(action, help=helptext)
        mp.add_argument("name", help="registered model name")
        if action in ("promote", "delete"):
            mp.add_argument("version", help="version number")
        if action in ("promote", "rollback"):
            mp.add_argument("--alias", default="champion")
        mp.add_argument("--tracking-uri", help="MLflow tracking/registry URI")
        mp.add_argument("--config", dest="file", help="take the registry from this run config instead")
        mp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
        mp.set_defaults(fn=cmd_models)

    ex = sub.add_parser("export", help="write a run's adapter, and with --merge the merged model")
    ex.add_argument("run", help="the run folder, <storage_path>/<name>")
    ex.add_argument("--out", required=True, help="output folder (gets adapter/ and, with --merge, merged/)")
    ex.add_argument("--merge", action="store_true", help="also fold the adapter into the base (checked against base+adapter)")
    ex.add_argument("--checkpoint", default="best", help="best (lowest eval loss, default), latest, or a checkpoint folder")
    ex.add_argument("--register", metavar="NAME", help="also register the export (merged model, else adapter) as a new version of NAME in the MLflow registry")
    ex.set_defaults(fn=cmd_export)

    sv = sub.add_parser("serve", help="OpenAI-compatible endpoint on Ray Serve (merged model, or base + LoRA adapters)")
    sv.add_argument("file", nargs="?", help="a config whose serve: section says what to serve")
    sv.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. --set serve.port=8001")
    sv.add_argument("--model", help="merged model or base: folder, hub id, or models:/NAME@alias (overrides serve.model)")
    sv.add_argument("--adapter", action="append", metavar="NAME=PATH", help="serve a LoRA adapter as <model>:NAME (repeatable)")
    sv.add_argument("--host", help="listen address (default 127.0.0.1; anything else requires --keys-file)")
    sv.add_argument("--port", type=int, help="HTTP port (default 8000)")
    sv.add_argument("--keys-file", help="hashed API keys (YAML list of {sha256, tenant, adapters})")
    sv.add_argument("--tracking-uri", help="MLflow tracking/registry URI for models:/ URIs (default: the config's)")
    sv.add_argument("--hash-key", action="store_true", help="print the sha256 of the key read from stdin, for the keys file")
    sv.add_argument("--smoke-test", action="store_true", help="start, answer /health and one completion, then stop")
    sv.set_defaults(fn=cmd_serve)

    # Cluster: plan, submit and manage jobs (cluster/plan.py, cluster/jobs.py).
    from ..jobs import add_connection_options, add_submit_options

    pl = with_file(sub.add_parser("plan", help="memory per GPU and tokens per step; the cluster.yaml worker type that fits"))
    pl.add_argument("--cluster", help="cluster launcher config to recommend from (default: cluster.yaml of the project)")
    pl.add_argument("--json", action="store_true", help="print the figures as JSON")
    pl.set_defaults(fn=cmd_plan)
    sm = sub.add_parser("submit", help="run a rayft command on a Ray cluster as a job: rayft submit FILE -- train",
                        usage="rayft submit FILE [--address URL] [--no-wait] [--env K=V] -- train|tune|run|serve|data prepare [ARGS]")
    sm.add_argument("file", help="the run's YAML config (inside the project folder, which is uploaded)")
    add_submit_options(sm)
    sm.add_argument("rest", nargs=argparse.REMAINDER, help="-- then the rayft command and its options")
    sm.set_defaults(fn=cmd_submit)
    jb = sub.add_parser("jobs", help="list, inspect, follow or stop Ray jobs").add_subparsers(dest="action", required=True, metavar="ACTION")
    add_connection_options(jb.add_parser("list", help="every job on the cluster, newest first"))
    for name, text in (("status", "a job's status and message"), ("logs", "a job's logs"), ("stop", "stop a running job")):
        jp = jb.add_parser(name, help=text)
        jp.add_argument("job_id")
        add_connection_options(jp)
        if name == "logs":
            jp.add_argument("--follow", action="store_true", help="stream until the job ends; exit code reflects its status")
        if name == "status":
            jp.add_argument("--exit-code", action="store_true", help="exit 0 only if the job succeeded")
    for jp in jb.choices.values():
        jp.set_defaults(fn=cmd_jobs)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    from rayft.data.chat import TemplateError
    from rayft.data.formats import SourceError
    from rayft.security.access import AccessDenied, PolicyError
    from rayft.security.config import ArtifactKeyError

    from ..config import ConfigError

    args = build_parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # progress lines reach `ray job logs` and pipes as they happen
        sys.stdout.reconfigure(line_buffering=True)
    try:
        return args.fn(args)
    except (ConfigError, SourceError, TemplateError, UserError, AccessDenied, PolicyError, ArtifactKeyError) as e:
        _err(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
