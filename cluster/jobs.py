"""`rayft submit` and `rayft jobs`: rayft commands as Ray jobs, through Ray's job submission API.

    rayft submit FILE [--address URL] [--no-wait] -- train|tune|run|serve|data prepare ... [--set k=v]
    rayft jobs list | status ID | logs ID [--follow] | stop ID   [--address URL]

A job runs `python -m rayft.cluster.cli <command> FILE ...` on the cluster's head, with the project folder
uploaded as its `working_dir` (so the cluster runs exactly the code and config you have), the same
as `ray job submit --working-dir . -- python -m rayft.cluster.cli <command> FILE`. Inside the job Ray sets
`RAY_ADDRESS`, so the command joins the cluster instead of starting a local Ray.

Authentication: Ray 2.60 clusters use token authentication (`RAY_AUTH_MODE=token`; a new local
`ray.init()` turns it on and writes ~/.ray/auth_token, `ray start --head` turns it on when a token
exists). Ray's own SDK attaches the token only when
`RAY_AUTH_MODE=token` is set in the submitting process; rayft looks the token up where Ray keeps it
(`RAY_AUTH_TOKEN`, then the file at `RAY_AUTH_TOKEN_PATH`, then `~/.ray/auth_token`) and sends it as
the bearer token whenever it finds one, so `rayft submit` works against a protected head without
extra settings. A head without token auth ignores the header.
"""
from __future__ import annotations

import asyncio
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Callable, Optional

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded: environments, run outputs, history, caches. Ray also honours the project's .gitignore.
WORKING_DIR_EXCLUDES = [
    ".venv", "venv", "runs", ".git", "mlruns", "mlartifacts", "**/__pycache__", "*.egg-info",
    ".pytest_cache", ".hypothesis", ".ruff_cache", ".mypy_cache",
]
# Commands that take a config file, and how many words name them before FILE.
_FILE_COMMANDS = {"train": 1, "tune": 1, "run": 1, "serve": 1, "data": 2, "config": 2, "plan": 1}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobError(Exception):
    """A submission or job request that cannot be done; the message says what to fix."""


# --- connection -----------------------------------------------------------------------------------


def resolve_address(address: Optional[str]) -> str:
    """--address, else RAY_ADDRESS (as `ray job submit` does), else the local dashboard."""
    addr = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if addr.startswith("ray://") or addr == "auto":
        raise JobError(
            f"--address {addr!r}: jobs are submitted to the head's dashboard (HTTP), not the Ray client port; "
            f"use http://<head>:8265 (with `ray dashboard cluster.yaml` running: {DEFAULT_ADDRESS})")
    if "://" not in addr:
        addr = "http://" + addr
    return addr


def find_auth_token() -> Optional[str]:
    """The cluster token where Ray looks for it: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    custom = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(custom).expanduser() if custom else Path.home() / ".ray" / "auth_token"
    if custom and not path.is_file():
        raise JobError(f"RAY_AUTH_TOKEN_PATH={custom!r}: no such file; point it at the cluster's token file or unset it")
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return token or None


def make_client(address: Optional[str]):
    from ray.job_submission import JobSubmissionClient

    addr = resolve_address(address)
    token = find_auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(addr, headers=headers)
    except ConnectionError as e:
        raise JobError(
            f"--address {addr}: no Ray job API answers there ({_first_line(e)}). Start the cluster "
            "(`ray up cluster.yaml`, then `ray dashboard cluster.yaml` to tunnel port 8265) or pass the head's "
            "dashboard URL with --address / RAY_ADDRESS") from None
    except Exception as e:
        if _is_auth_error(e):
            raise _auth_job_error(addr, e, token is not None) from None
        raise


def _is_auth_error(e: BaseException) -> bool:
    try:
        from ray.exceptions import AuthenticationError
    except ImportError:  # pragma: no cover - older Ray
        return False
    return isinstance(e, AuthenticationError)


def _auth_job_error(addr: str, e: BaseException, had_token: bool) -> JobError:
    what = ("the cluster refused the token found here" if had_token
            else "the cluster needs a token and none was found here")
    return JobError(f"--address {addr}: {what} ({_first_line(e)}). Put the cluster's token (`ray get-auth-token` on "
                    "the head) in ~/.ray/auth_token, RAY_AUTH_TOKEN or the file named by RAY_AUTH_TOKEN_PATH")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# --- submit ---------------------------------------------------------------------------------------


def project_root() -> Path:
    """The folder uploaded as working_dir: the current folder if it is the rayft project, else the
    project this code was loaded from."""
    for candidate in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (candidate / "cluster" / "cli.py").is_file() and (candidate / "pyproject.toml").is_file():
            return candidate.resolve()
    raise JobError("rayft submit uploads the project folder (the one holding pyproject.toml and cluster/) as the "
                   "job's working_dir; run it from that folder")


def build_entrypoint(config_file: str, command: list[str], root: Path, known: dict[str, set]) -> tuple[str, str]:
    """(entrypoint, config path relative to the project). `command` is what follows `--`."""
    import shlex

    if not command:
        raise JobError("nothing to run: add the rayft command after `--`, for example "
                       "`rayft submit FILE -- train` or `rayft submit FILE -- data prepare`")
    head = command[0]
    if head not in _FILE_COMMANDS or head == "plan":
        allowed = sorted(c for c in _FILE_COMMANDS if c in known and c != "plan")
        raise JobError(f"command {head!r} after `--` cannot be submitted; use one of {allowed} "
                       "(each runs on the config FILE)")
    if head not in known:
        raise JobError(f"command {head!r}: this version of rayft has no `rayft {head}` yet; "
                       f"available: {sorted(c for c in _FILE_COMMANDS if c in known and c != 'plan')}")
    words = _FILE_COMMANDS[head]
    if words == 2:
        if len(command) < 2 or command[1] not in known[head]:
            raise JobError(f"`{head}` needs an action after it: one of {sorted(known[head])}, "
                           f"for example `-- {head} {sorted(known[head])[0]}`")
    p = Path(config_file).resolve()
    if not p.is_file():
        raise JobError(f"{config_file}: no such config file")
    try:
        rel = p.relative_to(root)
    except ValueError:
        raise JobError(f"{config_file}: the config must be inside the project folder {root} (only that folder "
                       "is uploaded to the cluster); copy it under examples/ or a folder of the project") from None
    argv = ["python", "-m", "rayft.cluster.cli", *command[:words], rel.as_posix(), *command[words:]]
    return " ".join(shlex.quote(a) for a in argv), rel.as_posix()


def overrides_in(args: list[str]) -> list[str]:
    """The `--set k=v` values of a command line (to check the config before uploading anything)."""
    out, it = [], iter(args)
    for a in it:
        if a == "--set":
            out.append(next(it, ""))
        elif a.startswith("--set="):
            out.append(a[len("--set="):])
    return out


def make_submission_id(name: str, command: list[str]) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{name}-{'-'.join(command[:2])}")[:60].strip("-")
    return f"rayft-{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def submit(config_file: str, command: list[str], address: Optional[str] = None,
           env_vars: Optional[dict] = None, pip: Optional[list[str]] = None,
           entrypoint_num_cpus: Optional[float] = None, log: Callable[[str], None] = print) -> tuple[object, str]:
    """Check the config locally, then submit; returns (client, job id)."""
    from .cli import build_parser
    from .config import load_config

    root = project_root()
    entrypoint, rel = build_entrypoint(config_file, command, root, known_commands(build_parser()))
    cfg = load_config(config_file, overrides_in(command))  # a config mistake never reaches the cluster
    runtime_env: dict = {"working_dir": str(root), "excludes": list(WORKING_DIR_EXCLUDES)}
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    if pip:
        runtime_env["pip"] = list(pip)
    client = make_client(address)
    job_id = client.submit_job(
        entrypoint=entrypoint, runtime_env=runtime_env, submission_id=make_submission_id(cfg.name, command),
        metadata={"rayft_command": " ".join(command[:2]), "rayft_config": rel, "rayft_run": cfg.name},
        entrypoint_num_cpus=entrypoint_num_cpus,
    )
    log(f"submitted job {job_id} to {client.get_address()}")
    log(f"  entrypoint: {entrypoint}")
    log(f"  working_dir: {root}")
    return client, job_id


def known_commands(parser) -> dict[str, set]:
    """Top-level commands of the rayft parser, with their actions (for `data prepare`, `config show`)."""
    import argparse

    out: dict[str, set] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                acts = set()
                for a in sub._actions:
                    if isinstance(a, argparse._SubParsersAction):
                        acts |= set(a.choices)
                out[name] = acts
    return out


# --- follow, status, logs, stop -------------------------------------------------------------------


def follow(client, job_id: str, timeout_s: Optional[float] = None, out=None) -> str:
    """Stream the job's logs until it ends; returns its final status (or the current one on timeout)."""
    out = out or sys.stdout

    async def _tail():
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(asyncio.wait_for(_tail(), timeout=timeout_s))
    except asyncio.TimeoutError:
        return str(client.get_job_status(job_id).value)
    except Exception as e:  # the log stream broke (proxy, restart); fall back to polling the status
        print(f"(log stream interrupted: {_first_line(e)}; waiting for the job to end)", file=sys.stderr)
    return wait(client, job_id, timeout_s=timeout_s)


def wait(client, job_id: str, timeout_s: Optional[float] = None, poll_s: float = 1.0) -> str:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(poll_s)


def exit_code_for(status: str) -> int:
    return 0 if status == "SUCCEEDED" else 1


def list_jobs(client) -> str:
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0, reverse=True)
    if not jobs:
        return "no jobs"
    rows = [("JOB ID", "STATUS", "STARTED", "ENTRYPOINT")]
    for j in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        rows.append((j.submission_id or j.job_id or "-", str(j.status.value), started, j.entrypoint))
    w0 = max(len(r[0]) for r in rows)
    return "\n".join(f"{r[0]:{w0}s}  {r[1]:9s}  {r[2]:19s}  {r[3]}" for r in rows)


def job_status(client, job_id: str) -> str:
    info = _info(client, job_id)
    lines = [f"{job_id}: {info.status.value}"]
    if info.message:
        lines.append(f"  {info.message}")
    if info.entrypoint:
        lines.append(f"  entrypoint: {info.entrypoint}")
    if info.start_time:
        end = info.end_time or time.time() * 1000
        lines.append(f"  running time: {(end - info.start_time) / 1000:.0f} s")
    return "\n".join(lines)


def _info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e).lower():
            raise JobError(f"job {job_id!r} does not exist on {client.get_address()}; `rayft jobs list` shows the ids") from None
        raise


def stop(client, job_id: str) -> str:
    info = _info(client, job_id)
    if str(info.status.value) in TERMINAL:
        return f"{job_id} already ended ({info.status.value})"
    client.stop_job(job_id)
    return f"stop requested for {job_id}; `rayft jobs status {job_id}` shows when it has stopped"


# --- the command line (called by cluster/cli.py) --------------------------------------------------


def add_connection_options(p) -> None:
    p.add_argument("--address", help=f"the head's job API: http://HOST:8265 (default: RAY_ADDRESS, else {DEFAULT_ADDRESS})")


def add_submit_options(p) -> None:
    add_connection_options(p)
    p.add_argument("--no-wait", action="store_true", help="print the job id and return; do not follow the logs")
    p.add_argument("--timeout-s", type=float, help="stop following after this many seconds (the job keeps running)")
    p.add_argument("--env", action="append", metavar="KEY=VALUE", help="environment variable for the job (repeatable)")
    p.add_argument("--pip", action="append", metavar="PACKAGE", help="extra pip package for the job's runtime_env (repeatable)")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the job's driver (default: none)")


def _split_rest(args) -> list[str]:
    """Options written after FILE and before `--` belong to submit; the rest is the rayft command."""
    import argparse

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
    import functools

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
def run_submit(args) -> int:
    command = _split_rest(args)
    client, job_id = submit(args.file, command, args.address, env_vars=_env(args.env), pip=args.pip,
                            entrypoint_num_cpus=args.entrypoint_num_cpus)
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
def run_jobs(args) -> int:
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
