"""`rayft models list|promote|rollback|delete`: the MLflow registry. Changes are checked against the access policy
(cluster/access.py) and audited."""
from __future__ import annotations

from .common import load_args_config
from .errors import UserError


def add_models(sub, command) -> None:
    mo = sub.add_parser("models", help=command.help).add_subparsers(dest="action", required=True, metavar="ACTION")
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


def _registry_uri(args) -> str:
    if args.tracking_uri:
        return args.tracking_uri
    if args.file:
        from rayft.registry.tracking import tracking_uri

        cfg = load_args_config(args)
        return tracking_uri(cfg.tracking.tracking_uri, cfg.storage_path)
    raise UserError("give the registry: --tracking-uri URI (for example sqlite:///runs/mlflow.db) or --config FILE")


def cmd_models(args) -> int:
    """The MLflow registry: list versions, promote one to an alias, roll an alias back, delete a version.
    Changes are checked against the access policy (cluster/access.py) and audited."""
    from rayft.registry.versions import delete_version, list_versions, promote, rollback

    from ..access import require

    uri = _registry_uri(args)
    security = load_args_config(args).security if args.file else None  # None: defaults + RAYFT_POLICY_FILE / RAYFT_AUDIT_LOG
    if args.action == "promote":
        require(security, "promote", f"models:/{args.name}/{args.version}@{args.alias}")
    elif args.action == "rollback":
        require(security, "rollback", f"models:/{args.name}@{args.alias}")
    elif args.action == "delete":
        require(security, "delete", f"models:/{args.name}/{args.version}")
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
    return 0
