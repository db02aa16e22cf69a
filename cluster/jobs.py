"""`rayft submit` and `rayft jobs`: rayft commands as Ray jobs, through Ray's job submission API.

    rayft submit FILE [--address URL] [--no-wait] -- train|tune|run|serve|data prepare ... [--set k=v]
    rayft jobs list | status ID | logs ID [--follow] | stop ID   [--address URL]

A job runs `python -m rayft.cluster.cli <command> FILE ...` on the cluster's head. The current folder (the
user's project: configs, data) is uploaded as its `working_dir`, and the rayft code of this machine is shipped
with it as a `py_modules` entry (a copy of the installed `rayft` package, staged by `stage_package`), so the job
runs exactly the code and config you have, whatever version is installed on the cluster. `rayft submit --dry-run`
prints the equivalent plain `ray job submit` command. Inside the job Ray sets `RAY_ADDRESS`, so the command joins
the cluster instead of starting a local Ray.

Authentication: Ray 2.60 clusters use token authentication (`RAY_AUTH_MODE=token`; a new local
`ray.init()` turns it on and writes ~/.ray/auth_token, `ray start --head` turns it on when a token
exists). Ray's own SDK attaches the token only when
`RAY_AUTH_MODE=token` is set in the submitting process; rayft looks the token up where Ray keeps it
(`RAY_AUTH_TOKEN`, then the file at `RAY_AUTH_TOKEN_PATH`, then `~/.ray/auth_token`) and sends it as
the bearer token whenever it finds one, so `rayft submit` works against a protected head without
extra settings. A head without token auth ignores the header.

Access: before anything is uploaded or even connected, the access policy is checked here for the command inside
the job (`-- run` needs train or tune, promote unless the effective promotion policy is `never`, and deploy with
`--serve`; `-- serve` needs deploy), for the user who submits ($RAYFT_USER, else the OS user), with one audit line
per decision (source `submit`). The job then runs as that user: `rayft submit` sets RAYFT_USER and
RAYFT_SUBMITTED_BY in its environment (and `rayft_submitted_by` in its metadata), so every audit line the job writes
names the submitter, and `--env RAYFT_USER=...` is refused. Anyone holding the cluster's token can run any code on
the cluster, so inside the cluster this is attribution, not enforcement.
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

from rayft.security.access import SUBMITTED_BY_ENV, USER_ENV

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded: environments, run outputs, history, caches. Ray also honours the project's .gitignore.
WORKING_DIR_EXCLUDES = [
    ".venv", "venv", "runs", ".git", "mlruns", "mlartifacts", "**/__pycache__", "*.egg-info",
    ".pytest_cache", ".hypothesis", ".ruff_cache", ".mypy_cache",
]
# Where `rayft submit` stages the rayft package it ships (inside the project folder, never uploaded with it).
STAGE_DIR = ".rayft/py_modules"
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
    """The folder uploaded as the job's working_dir: the current folder, as `ray job submit --working-dir .`."""
    return Path.cwd().resolve()


def stage_package(dest: Path) -> Path:
    """Copy the rayft package this process runs (editable checkout or installed wheel) into `dest/rayft`, as a
    regular package, for the job's `py_modules`: on the cluster it comes first on the path, so a job never runs
    a stale rayft installed there. Returns the staged `rayft` folder."""
    import importlib
    import shutil

    target = Path(dest) / "rayft"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    (target / "__init__.py").write_text('"""rayft, shipped with a Ray job (rayft submit)."""\n')
    for sub in PACKAGES:
        src = Path(importlib.import_module(f"rayft.{sub}").__file__).parent
        shutil.copytree(src, target / sub, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


# The subpackages of rayft that a job needs (examples carries the sample data the shipped configs name).
PACKAGES = ("cluster", "data", "eval", "models", "registry", "security", "serve", "train", "tune", "examples")


def build_entrypoint(config_file: str, command: list[str], root: Path) -> tuple[str, str]:
    """(entrypoint, config path relative to the project). `command` is what follows `--`."""
    import shlex

    from .commands import SUBMITTABLE

    if not command:
        raise JobError("nothing to run: add the rayft command after `--`, for example "
                       "`rayft submit FILE -- train` or `rayft submit FILE -- data prepare`")
    head = command[0]
    if head not in SUBMITTABLE:
        raise JobError(f"command {head!r} after `--` cannot be submitted; use one of {sorted(SUBMITTABLE)} "
                       "(each runs on the config FILE)")
    spec = SUBMITTABLE[head]
    if spec.actions and (len(command) < 2 or command[1] not in spec.actions):
        raise JobError(f"`{head}` needs an action after it: one of {sorted(spec.actions)}, "
                       f"for example `-- {head} {sorted(spec.actions)[0]}`")
    p = Path(config_file).resolve()
    if not p.is_file():
        raise JobError(f"{config_file}: no such config file")
    try:
        rel = p.relative_to(root)
    except ValueError:
        raise JobError(f"{config_file}: the config must be inside the project folder {root} (the current folder, "
                       "the only one uploaded to the cluster); run rayft submit from the folder that holds it") from None
    words = spec.file_words
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


def runtime_env_for(root: Path, env_vars: Optional[dict] = None, pip: Optional[list[str]] = None) -> dict:
    """The job's runtime_env: the project folder as working_dir and the staged rayft package as py_modules."""
    staged = stage_package(root / STAGE_DIR)
    runtime_env: dict = {"working_dir": str(root), "py_modules": [str(staged)],
                         "excludes": [*WORKING_DIR_EXCLUDES, ".rayft"]}
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


def check_submission(cfg, command: list[str], env_vars: Optional[dict]) -> str:
    """The access checks the command inside the job will make, made here for the submitting user (one audit line
    each, source `submit`); raises AccessDenied before anything is uploaded. Returns the submitting principal."""
    from rayft.security.access import current_user

    from .access import command_actions, require

    for name in (USER_ENV, SUBMITTED_BY_ENV):
        if name in (env_vars or {}):
            raise JobError(f"--env {name}=...: a job runs as the user who submits it and is recorded as such; remove "
                           f"the --env and set {USER_ENV} in your own environment when you act as another account "
                           f"(the policy is checked for that user before the job is submitted)")
    submitter = current_user()
    for action, target in command_actions(cfg, command):
        require(cfg, action, target, principal=submitter, source="submit")
    return submitter


def submit(config_file: str, command: list[str], address: Optional[str] = None,
           env_vars: Optional[dict] = None, pip: Optional[list[str]] = None,
           entrypoint_num_cpus: Optional[float] = None, log: Callable[[str], None] = print,
           dry_run: bool = False) -> tuple[object, Optional[str]]:
    """Check the config locally, then submit; returns (client, job id). With dry_run, print the equivalent
    `ray job submit` command instead and return (None, None)."""
    import json
    import shlex

    from .config import load_config

    root = project_root()
    entrypoint, rel = build_entrypoint(config_file, command, root)
    cfg = load_config(config_file, overrides_in(command))  # a config mistake never reaches the cluster
    submitter = check_submission(cfg, command, env_vars)  # nor does a command the policy denies
    env_vars = {**(env_vars or {}), USER_ENV: submitter, SUBMITTED_BY_ENV: submitter}
    runtime_env = runtime_env_for(root, env_vars, pip)
    if dry_run:
        env = {k: v for k, v in runtime_env.items() if k != "working_dir"}
        log("ray job submit --address " + resolve_address(address) + " --working-dir . --runtime-env-json "
            + shlex.quote(json.dumps(env)) + " -- " + entrypoint)
        return None, None
    client = make_client(address)
    job_id = client.submit_job(
        entrypoint=entrypoint, runtime_env=runtime_env, submission_id=make_submission_id(cfg.name, command),
        metadata={"rayft_command": " ".join(command[:2]), "rayft_config": rel, "rayft_run": cfg.name,
                  "rayft_submitted_by": submitter},
        entrypoint_num_cpus=entrypoint_num_cpus,
    )
    log(f"submitted job {job_id} to {client.get_address()} as {submitter!r} (its audit lines name the submitter)")
    log(f"  entrypoint: {entrypoint}")
    log(f"  working_dir: {root}; py_modules: {runtime_env['py_modules'][0]} (this machine's rayft)")
    return client, job_id


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
