"""`rayft plan`, `rayft submit` and `rayft jobs`: sizing a run for a cluster, and rayft commands as Ray jobs
(the job API itself is `cluster/jobs.py`)."""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Optional

from ..jobs import (
    DEFAULT_ADDRESS,
    TERMINAL,
    JobError,
    _auth_job_error,
    _info,
    _is_auth_error,
    exit_code_for,
    find_auth_token,
    follow,
    job_status,
    list_jobs,
    make_client,
    resolve_address,
    stop,
    submit,
)
from .common import with_file


def add_plan(sub, command) -> None:
    pl = with_file(sub.add_parser("plan", help=command.help))
    pl.add_argument("--cluster", help="cluster launcher config to recommend from (default: the packaged cluster.yaml)")
    pl.add_argument("--json", action="store_true", help="print the figures as JSON")
    pl.add_argument("--device", choices=("gpu", "cpu"), default=None,
                    help="plan GPU memory per worker, or a CPU worker's host memory above its idle baseline "
                    "(default: gpu when train.use_gpu is true, else cpu)")
    pl.set_defaults(fn=cmd_plan)


def add_submit(sub, command) -> None:
    sm = sub.add_parser("submit", help=command.help,
                        usage="rayft submit FILE [--address URL] [--no-wait] [--env K=V] [--dry-run] -- "
                        "train|tune|run|serve|data prepare [ARGS]")
    sm.add_argument("file", help="the run's YAML config (inside the current folder, which is uploaded)")
    add_submit_options(sm)
    sm.add_argument("rest", nargs=argparse.REMAINDER, help="-- then the rayft command and its options")
    sm.set_defaults(fn=cmd_submit)


def add_jobs(sub, command) -> None:
    jb = sub.add_parser("jobs", help=command.help).add_subparsers(dest="action", required=True, metavar="ACTION")
    add_connection_options(jb.add_parser("list", help="every job on the cluster, newest first"))
    for name, text in (("status", "a job's status and message"), ("logs", "a job's logs"), ("stop", "stop a running job")):
        jp = jb.add_parser(name, help=text)
        jp.add_argument("job_id")
        add_connection_options(jp)
        if name == "logs":
            jp.add_argument("--follow", action="store_true",
                            help="stream until the job ends; exit code reflects its status")
        if name == "status":
            jp.add_argument("--exit-code", action="store_true", help="exit 0 only if the job succeeded")
    for jp in jb.choices.values():
        jp.set_defaults(fn=cmd_jobs)


def cmd_plan(args) -> int:
    from ..plan import run_plan

    return run_plan(args)


def add_connection_options(p) -> None:
    p.add_argument("--address", help=f"the head's job API: http://HOST:8265 (default: RAY_ADDRESS, else {DEFAULT_ADDRESS})")


def add_submit_options(p) -> None:
    add_connection_options(p)
    p.add_argument("--no-wait", action="store_true", help="print the job id and return; do not follow the logs")
    p.add_argument("--timeout-s", type=float, help="stop following after this many seconds (the job keeps running)")
    p.add_argument("--env", action="append", metavar="KEY=VALUE", help="environment variable for the job (repeatable)")
    p.add_argument("--pip", action="append", metavar="PACKAGE", help="extra pip package for the job's runtime_env (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the equivalent `ray job submit` command (rayft staged for py_modules) and submit nothing")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the job's driver (default: none)")


def _split_rest(args) -> list[str]:
    """Options written after FILE and before `--` belong to submit; the rest is the rayft command."""
    p = argparse.ArgumentParser(prog="rayft submit FILE", add_help=False)
    add_submit_options(p)
    p.add_argument("command", nargs=argparse.REMAINDER)
    late = p.parse_args(args.rest)
    for key, value in vars(late).items():
        if key != "command" and value not in (None, False):
            current = getattr(args, key, None)
            setattr(args, key, (current or []) + value if isinstance(value, list) else value)
    command = list(late.command)
    if command and command[0] == "--":
        command = command[1:]
    return command


def _env(pairs: Optional[list[str]]) -> dict:
    out = {}
    for item in pairs or []:
        if "=" not in item or not item.split("=", 1)[0]:
            raise JobError(f"--env {item!r}: expected KEY=VALUE, for example --env DS_ACCELERATOR=cpu")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def _auth_errors_explained(fn):
    """A token refused mid-command (after connecting) gets the same explanation as at connect time."""
    @functools.wraps(fn)
    def wrapper(args):
        try:
            return fn(args)
        except Exception as e:
            if _is_auth_error(e):
                addr = resolve_address(getattr(args, "address", None))
                raise _auth_job_error(addr, e, find_auth_token() is not None) from None
            raise

    return wrapper


@_auth_errors_explained
def cmd_submit(args) -> int:
    command = _split_rest(args)
    client, job_id = submit(args.file, command, args.address, env_vars=_env(args.env), pip=args.pip,
                            entrypoint_num_cpus=args.entrypoint_num_cpus, dry_run=args.dry_run)
    if args.dry_run:
        return 0
    if args.no_wait:
        print(f"follow it with: rayft jobs logs {job_id} --follow")
        return 0
    try:
        status = follow(client, job_id, timeout_s=args.timeout_s)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (rayft jobs stop {job_id} to stop it)", file=sys.stderr)
        return 130
    print(f"job {job_id}: {status}")
    if status not in TERMINAL:
        print(f"still running after --timeout-s {args.timeout_s:g}; rayft jobs logs {job_id} --follow", file=sys.stderr)
    return exit_code_for(status)


@_auth_errors_explained
def cmd_jobs(args) -> int:
    client = make_client(args.address)
    if args.action == "list":
        print(list_jobs(client))
        return 0
    if args.action == "status":
        print(job_status(client, args.job_id))
        return exit_code_for(str(_info(client, args.job_id).status.value)) if args.exit_code else 0
    if args.action == "logs":
        _info(client, args.job_id)
        if args.follow:
            return exit_code_for(follow(client, args.job_id))
        sys.stdout.write(client.get_job_logs(args.job_id))
        return 0
    if args.action == "stop":
        print(stop(client, args.job_id))
        return 0
    raise JobError(f"unknown jobs action {args.action!r}")
