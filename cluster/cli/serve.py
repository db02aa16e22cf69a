"""`rayft serve`: an OpenAI-compatible endpoint on Ray Serve, from a config's `serve:` section or from flags."""
from __future__ import annotations

import sys

from .common import load_args_config
from .errors import UserError


def add_serve(sub, command) -> None:
    sv = sub.add_parser("serve", help=command.help)
    sv.add_argument("file", nargs="?", help="a config whose serve: section says what to serve")
    sv.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. --set serve.port=8001")
    sv.add_argument("--model", help="merged model or base: folder, hub id, or models:/NAME@alias (overrides serve.model)")
    sv.add_argument("--adapter", action="append", metavar="NAME=PATH",
                    help="serve a LoRA adapter as <model>:NAME (repeatable)")
    sv.add_argument("--host", help="listen address (default 127.0.0.1; anything else requires --keys-file)")
    sv.add_argument("--port", type=int, help="HTTP port (default 8000)")
    sv.add_argument("--engine", choices=["auto", "vllm", "hf"],
                    help="vllm (Ray Serve LLM), hf (rayft's transformers engine), auto: vllm when installed (default)")
    sv.add_argument("--keys-file", help="hashed API keys (YAML list of {sha256, tenant, adapters})")
    sv.add_argument("--tracking-uri", help="MLflow tracking/registry URI for models:/ URIs (default: the config's)")
    sv.add_argument("--hash-key", action="store_true",
                    help="print the sha256 of the key read from stdin, for the keys file")
    sv.add_argument("--smoke-test", action="store_true", help="start, answer /health and one completion, then stop")
    sv.set_defaults(fn=cmd_serve)


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
    flags = {k: v for k, v in (("host", args.host), ("port", args.port), ("api_keys_file", args.keys_file),
                                      ("engine", args.engine)) if v is not None}
    adapters = {}
    for item in args.adapter or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--adapter {item!r}: expected NAME=PATH, for example --adapter support=runs/support/export/adapter")
        adapters[name] = path
    address, num_cpus, tracking, security = None, None, args.tracking_uri, None
    if args.file:
        from rayft.registry.tracking import tracking_uri

        cfg = load_args_config(args)
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
