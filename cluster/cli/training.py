"""`rayft train`, `rayft tune`, `rayft run` and `rayft export`: training, the search, the whole pipeline, and
exporting a run's adapter (merged on request)."""
from __future__ import annotations

from .common import load_args_config, with_file
from .errors import UserError


def add_train(sub, command) -> None:
    tr = with_file(sub.add_parser("train", help=command.help))
    tr.add_argument("--resume", action="store_true",
                    help="continue from the run's last intact checkpoint; an error if there is none "
                    "(without it, re-running the same config also continues)")
    tr.set_defaults(fn=cmd_train)


def add_tune(sub, command) -> None:
    tu = with_file(sub.add_parser("tune", help=command.help))
    tu.add_argument("--resume", action="store_true", help="continue an interrupted search; finished trials are kept")
    tu.set_defaults(fn=cmd_tune)


def add_run(sub, command) -> None:
    rn = with_file(sub.add_parser("run", help=command.help))
    rn.add_argument("--resume", action="store_true", help="continue an interrupted training run or search")
    rn.add_argument("--serve", action="store_true", help="then serve the champion until interrupted (Ctrl-C)")
    rn.add_argument("--port", type=int, help="with --serve: HTTP port (default: serve.port of the config)")
    rn.add_argument("--promote", choices=["better_eval_loss", "always", "never"],
                    help="promotion policy for the new version (default: tune.promotion.policy, else better_eval_loss)")
    rn.set_defaults(fn=cmd_run)


def add_export(sub, command) -> None:
    ex = sub.add_parser("export", help=command.help)
    ex.add_argument("run", help="the run folder, <storage_path>/<name>")
    ex.add_argument("--out", required=True, help="output folder (gets adapter/ and, with --merge, merged/)")
    ex.add_argument("--merge", action="store_true",
                    help="also fold the adapter into the base (checked against base+adapter)")
    ex.add_argument("--checkpoint", default="best",
                    help="best (lowest eval loss, default), latest, or a checkpoint folder")
    ex.add_argument("--register", metavar="NAME", help="also register the export (merged model, else adapter) as a "
                    "new version of NAME in the MLflow registry")
    ex.set_defaults(fn=cmd_export)


def cmd_train(args) -> int:
    """Prepare the data, train on Ray (DeepSpeed + LoRA), track in MLflow, register the adapter."""
    from rayft.train.trainer import check_before_start, run_training

    from ..access import planned_actions, require
    from ..ray_conn import connect

    cfg = load_args_config(args)
    for action, target in planned_actions(cfg, "train"):
        require(cfg, action, target)
    check_before_start(cfg.model, cfg.train)  # config mistakes surface before Ray starts
    print(connect(cfg.ray.address, cfg.ray.num_cpus))
    out = run_training(cfg, resume=args.resume)
    m = out.metrics
    summary = [f"finished {m.get('global_step')}/{m.get('total_steps')} steps"]
    if m.get("eval_loss") is not None:
        summary.append(f"eval loss {m['eval_loss']:.4f} (before training "
                       f"{m.get('initial_eval_loss') or float('nan'):.4f})")
    print(", ".join(summary))
    print(f"run folder: {out.run_dir}")
    print(f"adapter: {out.adapter_dir}")
    if out.mlflow_run_id:
        print(f"MLflow run {out.mlflow_run_id} ({out.tracking_uri})")
    print(f"next: rayft export {out.run_dir} --out {out.run_dir}/export --merge")
    return 0


def cmd_tune(args) -> int:
    """Search LoRA/optimizer settings with Ray Tune + ASHA, then export, register and promote the best."""
    from rayft.train.trainer import check_before_start
    from rayft.tune.search import run_search

    from ..access import planned_actions, require
    from ..ray_conn import connect

    cfg = load_args_config(args)
    if cfg.tune is None:
        raise UserError(f"{args.file}: no `tune:` section; add one with a search_space (see examples/quickstart.yaml)")
    for action, target in planned_actions(cfg, "tune"):  # promote too when the search may crown a champion
        require(cfg, action, target)
    check_before_start(cfg.model, cfg.train)  # the search space was checked when the config loaded
    print(connect(cfg.ray.address, cfg.ray.num_cpus))
    out = run_search(cfg, resume=args.resume)
    print(f"search folder: {out.search_dir}")
    if out.merged_dir:
        print(f"merged best model: {out.merged_dir}")
    for note in out.notes:
        print(note)
    return 0


def cmd_run(args) -> int:
    """The whole pipeline: data -> tune (or train) -> export + merge -> register + promote -> optionally serve."""
    from rayft.train.trainer import check_before_start

    from ..access import planned_actions, require
    from ..pipeline import run_pipeline, serve_stage, summary
    from ..ray_conn import connect

    cfg = load_args_config(args)
    # Every action the pipeline will take is checked (and audited) before any of it starts.
    for action, target in planned_actions(cfg, "run", promote=args.promote, serve=args.serve):
        require(cfg, action, target)
    check_before_start(cfg.model, cfg.train)
    print(connect(cfg.ray.address, cfg.ray.num_cpus))
    out = run_pipeline(cfg, resume=args.resume, policy=args.promote)
    scfg = serve_stage(cfg, out, args.serve, port=args.port)
    print(summary(out))
    if scfg is None:
        return 0
    from rayft.serve.app import run_server

    return run_server(scfg, scfg.model, out.tracking_uri, security=cfg.security)


def cmd_export(args) -> int:
    from rayft.security.config import SecurityConfig
    from rayft.train.export import export_run
    from rayft.train.trainer import read_run_file

    from ..access import require

    if args.register:  # a new registry version, as `rayft train` registers its adapter: the `train` action
        security = SecurityConfig.model_validate(read_run_file(args.run)["config"].get("security") or {})
        require(security, "train", f"models:/{args.register} (new version from {args.run})")
    export_run(args.run, args.out, merge=args.merge, which=args.checkpoint, register=args.register)
    return 0
