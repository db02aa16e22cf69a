"""Reliability benchmark: real faults injected into real training runs and a real Serve endpoint, on loopback.

Per fault it prints: what was injected, whether the system recovered, the time to recover, and the steps
(training) or requests (serving) lost.

    driver kill        `rayft train` (a subprocess, its own local Ray) is SIGKILLed with its whole process group
                       mid-run; the same command is run again
    worker kill        one Ray Train worker process is SIGKILLed mid-run; Ray Train restarts the worker group
                       (FailureConfig) and the loop resumes from the last checkpoint, in the same run
    unwritable storage the folder of the next checkpoint is taken by a file mid-run (a write failure even as
                       root); the run must stop with an error naming the path, then `--resume` continues
    corrupted latest   a file of the latest checkpoint of a finished run is truncated; `--resume` must skip it
                       and continue from the previous intact checkpoint
    S3 worker kill     on a two-node loopback cluster with every run artifact in a real S3 server (SeaweedFS) and
                       the sources read from it: one Ray Train worker is SIGKILLed mid-run; the group restarts
                       from the checkpoint in the bucket
    S3 node loss       the same, but every process of the worker node (raylet, agents, its workers) is SIGKILLed
                       at once; the group restarts on the head (workers placed SPREAD, half a CPU each)
    S3 drain           a preemption notice: `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` on the worker node
                       (what the autoscaler and spot integrations send); the workers checkpoint at the next step
                       boundary and stop; the group restarts on the head from that checkpoint
    S3 SIGTERM         SIGTERM to every Ray Train worker (a spot machine's shutdown): the same, noticed by the
                       workers' own handler
    replica kill       the engine replica's process (vLLM's, behind rayft's ingress; --serve-engine hf: the hf replica)
                       is SIGKILLed under closed-loop load; Serve restarts it
    soak               steady closed-loop load for --soak-s seconds: errors, latency, replica memory growth

Exit status 0 only if every fault was recovered from. Time to recover: training, from the fault (automatic recovery) or from the re-run (manual recovery) until the
run trains past the step it had reached when the fault hit (after a preemption notice, the step it reached before
the restart), i.e. until the lost work is redone; serving, from
the kill until the first successful answer to a request sent after it. Steps lost: steps trained before the
fault and trained again after it (the work since the last intact checkpoint). Requests lost: requests that
failed; every request sent after the recovery must succeed. The preemption rows also give the time from the notice
to the checkpoint being written (as the workers measured it), and are compared with the SIGKILL of a worker (the
same fault without a notice) in the same run.

    .venv/bin/python benchmarks/reliability.py            # 16-step runs, a 3-minute soak
    .venv/bin/python benchmarks/reliability.py --quick    # 12-step runs, a 30-second soak
Both take 13-15 minutes on a shared 2-core machine, mostly Ray, data and DeepSpeed start-up of the training runs.
    .venv/bin/python benchmarks/reliability.py --quick --only s3,preempt   # the two-node cluster cases only
    options: --steps N --every K --soak-s S --concurrency C --serve-engine vllm|hf --workdir DIR --out results.json
             --only a,b

The model is rayft's tiny Llama (no weights can be downloaded here) and the sample data of the quickstart.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

STEP_LINE = re.compile(r"step (\d+)/(\d+)")
RESUMED_LINE = re.compile(r"resumed from (checkpoint_step\d+) at step (\d+)")
PREEMPTION_LINE = re.compile(r"preemption: .* written ([\d.]+)s after the notice")
RAYFT = str(Path(sys.executable).with_name("rayft"))


class Progress:
    """Timestamped log lines of a training run: the steps it reached and where it resumed."""

    def __init__(self):
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def __call__(self, message) -> None:
        with self._lock:
            self.lines.append((time.monotonic(), str(message)))

    def steps(self, since: float = 0.0) -> list[tuple[float, int]]:
        with self._lock:
            return [(t, int(m.group(1))) for t, line in self.lines if t >= since
                    for m in [STEP_LINE.search(line)] if m]

    def last_step(self) -> int:
        s = self.steps()
        return s[-1][1] if s else 0

    def resumed(self, since: float = 0.0) -> list[tuple[float, str, int]]:
        with self._lock:
            return [(t, m.group(1), int(m.group(2))) for t, line in self.lines if t >= since
                    for m in [RESUMED_LINE.search(line)] if m]

    def passed(self, step: int, since: float) -> float | None:
        """Time of the first line after `since` reporting a step beyond `step`."""
        return next((t for t, s in self.steps(since) if s > step), None)

    def text(self) -> str:
        with self._lock:
            return "\n".join(line for _, line in self.lines)


def row(fault, injected, recovered, time_s, lost, note="") -> dict:
    return {"fault": fault, "injected": injected, "recovered": bool(recovered),
            "time_to_recover_s": None if time_s is None else round(time_s, 1), "lost": lost, "note": note}


def wait_for(predicate, timeout_s: float, poll_s: float = 0.05, alive=lambda: True):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()


def intact(run_dir: str, step: int) -> bool:
    from rayft.train.checkpoint import check_checkpoint, checkpoint_dir_name

    path = os.path.join(run_dir, checkpoint_dir_name(step))
    return os.path.isdir(path) and check_checkpoint(path) is None


def overrides(args, model_dir: str, storage: str, name: str, *extra: str) -> list[str]:
    return [f"name={name}", f"model.name_or_path={model_dir}", f"storage_path={storage}",
            f"train.max_steps={args.steps}", f"train.save_every_n_steps={args.every}",
            f"train.eval_every_n_steps={args.steps}", "train.logging_every_n_steps=1", "train.learning_rate=1e-2",
            "train.keep_best_checkpoints=4", "tracking.enabled=false", "data.max_seq_length=256", *extra]


# ------------------------------------------------------------------------------------------ training faults


def driver_kill(args, model_dir: str, storage: str) -> dict:
    """`rayft train` killed with its process group (driver and its local Ray), then run again."""
    name = "driver-kill"
    run_dir = os.path.join(storage, name)
    cmd = [RAYFT, "train", "examples/quickstart.yaml"]
    for o in overrides(args, model_dir, storage, name):
        cmd += ["--set", o]
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def launch(progress: Progress):
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env=env)
        threading.Thread(target=lambda: [progress(line.rstrip()) for line in proc.stdout], daemon=True).start()
        return proc

    first = Progress()
    proc = launch(first)
    try:
        ok = wait_for(lambda: intact(run_dir, args.every) and first.last_step() >= args.every + 2, 900,
                      alive=lambda: proc.poll() is None)
    finally:
        reached = first.last_step()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this script started: driver, raylet, workers
        proc.wait(timeout=60)
    if not ok:
        return row("driver kill", "no (the run ended first)", False, None, None, first.text()[-500:])
    second = Progress()
    t_rerun = time.monotonic()
    proc = launch(second)
    code = proc.wait(timeout=1200)
    resumed = second.resumed()
    back = second.passed(reached, t_rerun)
    finished = code == 0 and f"finished {args.steps}/{args.steps}" in second.text()
    from_step = resumed[0][2] if resumed else 0
    return row("driver kill", f"SIGKILL to rayft train's process group at step {reached}", finished and bool(resumed),
               back - t_rerun if back else None, f"{reached - from_step} steps",
               f"re-run resumed at step {from_step}; time from the re-run")


def _training_workers():
    import psutil
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    found = []
    for p in psutil.Process(raylet).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _fit_in_thread(cfg, data, progress: Progress, resume: bool = False):
    from rayft.train.trainer import fit

    box: dict = {}

    def run():
        try:
            box["outcome"] = fit(cfg, data, resume=resume, log=progress)
        except BaseException as e:  # noqa: BLE001 - reported in the table
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def worker_kill(args, cfg, data) -> dict:
    run_dir = os.path.join(cfg.storage_path, cfg.name)
    progress = Progress()
    thread, box = _fit_in_thread(cfg, data, progress)
    ok = wait_for(lambda: intact(run_dir, args.every) and progress.last_step() >= args.every + 2 and _training_workers(),
                  900, alive=thread.is_alive)
    if not ok:
        thread.join()
        return row("worker kill", "no (the run ended first)", False, None, None, str(box.get("error", ""))[:300])
    victim = _training_workers()[-1]
    reached = progress.last_step()
    t_kill = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    thread.join(timeout=1200)
    resumed = progress.resumed(t_kill)
    back = progress.passed(reached, t_kill)
    out = box.get("outcome")
    finished = out is not None and out.metrics.get("global_step") == args.steps
    from_step = resumed[0][2] if resumed else 0
    return row("worker kill", f"SIGKILL to a Ray Train worker (pid {victim.pid}) at step {reached}",
               finished and bool(resumed), back - t_kill if back else None, f"{reached - from_step} steps",
               f"resumed at step {from_step} in the same run (FailureConfig)"
               + (f"; error: {str(box['error'])[:200]}" if "error" in box else ""))


def corrupted_latest(args, cfg, data) -> dict:
    """The run of the worker-kill fault is finished; damage its latest checkpoint and `--resume`."""
    from rayft.train.checkpoint import best_and_latest, step_of

    run_dir = os.path.join(cfg.storage_path, cfg.name)
    latest = best_and_latest(run_dir)["latest"]
    if latest is None:
        return row("corrupted latest checkpoint", "no (no checkpoint)", False, None, None)
    target = os.path.join(latest, "adapter", "adapter_model.safetensors")
    os.truncate(target, os.path.getsize(target) // 2)
    damaged_step = step_of(os.path.basename(latest))
    progress = Progress()
    t0 = time.monotonic()
    thread, box = _fit_in_thread(cfg, data, progress, resume=True)
    thread.join(timeout=1200)
    resumed = progress.resumed()
    warned = "is not usable" in progress.text()
    from_step = resumed[0][2] if resumed else 0
    done = box.get("outcome") is not None and box["outcome"].metrics.get("global_step") == args.steps
    t_done = progress.passed(damaged_step - 1, t0)
    return row("corrupted latest checkpoint", f"truncated {os.path.basename(latest)}/adapter/adapter_model.safetensors",
               done and warned and 0 < from_step < damaged_step, t_done - t0 if t_done else None,
               f"{damaged_step - from_step} steps",
               f"--resume skipped it with a warning: {warned}; resumed at step {from_step}")


def unwritable_storage(args, cfg, data) -> dict:
    from rayft.train.checkpoint import checkpoint_dir_name

    run_dir = os.path.join(cfg.storage_path, cfg.name)
    blocked_step = 2 * args.every
    target = os.path.join(run_dir, checkpoint_dir_name(blocked_step))
    progress = Progress()
    thread, box = _fit_in_thread(cfg, data, progress)
    ok = wait_for(lambda: intact(run_dir, args.every), 900, alive=thread.is_alive)
    if ok and not os.path.exists(target):
        with open(target, "w") as f:
            f.write("a file where the checkpoint folder must go")
    thread.join(timeout=1200)
    err = str(box.get("error", ""))
    clear = f"cannot write checkpoint step {blocked_step} to {target}" in err and "--resume" in err
    previous_ok = intact(run_dir, args.every)
    if not ok or "error" not in box:
        return row("unwritable storage", "no (the run ended first)", False, None, None, err[:300])
    os.remove(target)
    progress2 = Progress()
    t_resume = time.monotonic()
    thread, box2 = _fit_in_thread(cfg, data, progress2, resume=True)
    thread.join(timeout=1200)
    resumed = progress2.resumed()
    from_step = resumed[0][2] if resumed else 0
    back = progress2.passed(blocked_step, t_resume)
    done = box2.get("outcome") is not None and box2["outcome"].metrics.get("global_step") == args.steps
    line = next((ln for ln in err.splitlines() if "cannot write checkpoint" in ln), err[:200])
    return row("unwritable storage", f"checkpoint {blocked_step}'s folder taken by a file mid-run", clear and previous_ok and done, back - t_resume if back else None,
               f"{blocked_step - from_step} steps",
               f"clear error: {clear}; checkpoint {args.every} intact: {previous_ok}; --resume from step {from_step}; "
               f"error: {line[:160]}")


# ------------------------------------------------------------------------------------------- serving faults


def cluster_faults(args, model_dir: str, work: str, kinds: set) -> list[dict]:
    """On a two-node loopback cluster whose runs live in a real S3 server: a worker kill and a node loss (`s3`),
    a drain and SIGTERM, the two preemption notices (`preempt`)."""
    from tests.cluster_helpers import _children_of, ray_train_workers, two_node_cluster
    from tests.s3_server import S3Server

    s3 = S3Server(Path(work) / "s3")
    s3.start()
    rows = []
    try:
        bucket = "bench"
        s3.create_bucket(bucket)
        names = ["support_qa.json", "chats.csv", "kb.jsonl", "tools_openai.jsonl", "tools_sharegpt.json"]
        for n in names:
            s3.upload(REPO / "examples" / "data" / n, f"s3://{bucket}/data/{n}")
        # Each node reads the keys from its own environment (never from a config or runtime_env): the nodes inherit
        # this process's.
        os.environ.update({k: v for k, v in s3.env.items() if k != "AWS_ENDPOINT_URL"})
        with two_node_cluster("rfb-") as cluster:
            env = dict(cluster.env, RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1", **s3.env)

            def kill_a_worker():
                victims = ray_train_workers(_children_of(cluster.node_pids()))
                if not victims:
                    return False
                os.kill(victims[-1], signal.SIGKILL)
                return True

            def lose_the_node():
                if not ray_train_workers(cluster.worker_node_pids()):
                    return False
                cluster.lose_worker_node()
                return True

            def drain_the_node():
                if not ray_train_workers(cluster.worker_node_pids()):
                    return False
                cluster.drain_worker_node(deadline_s=120)
                return True

            def sigterm_the_workers():
                victims = ray_train_workers(_children_of(cluster.node_pids()))
                for pid in victims:
                    os.kill(pid, signal.SIGTERM)
                return bool(victims)

            faults = []
            if "s3" in kinds or "preempt" in kinds:  # the preemption rows' baseline: the same fault without notice
                faults.append(("S3 worker kill", kill_a_worker, "SIGKILL to one Ray Train worker"))
            if "s3" in kinds:
                faults.append(("S3 node loss", lose_the_node, "SIGKILL to every process of the worker node"))
            if "preempt" in kinds:
                faults += [("S3 drain", drain_the_node, "drain (preemption, 120 s deadline) of the worker node"),
                           ("S3 SIGTERM", sigterm_the_workers, "SIGTERM to every Ray Train worker")]
            for fault, inject, what in faults:
                name = fault.lower().replace(" ", "-")
                extra = [f"storage_path=s3://{bucket}/runs", f"storage.endpoint_url={s3.endpoint}",
                         f"ray.address={cluster.gcs_address}", "train.num_workers=2", "train.cpus_per_worker=0.5",
                         "train.placement_strategy=SPREAD", "train.max_failures=2"]
                extra += [f"data.sources.{i}.path=s3://{bucket}/data/{n}" for i, n in enumerate(names)]
                cmd = [RAYFT, "train", "examples/quickstart.yaml"]
                for o in overrides(args, model_dir, f"s3://{bucket}/runs", name, *extra):
                    cmd += ["--set", o]
                progress = Progress()
                proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True, env=env)
                threading.Thread(target=lambda: [progress(line.rstrip()) for line in proc.stdout], daemon=True).start()
                ckpt = f"s3://{bucket}/runs/{name}/checkpoint_step{args.every:08d}/state.json"
                try:
                    ok = wait_for(lambda: progress.last_step() >= args.every + 2 and
                                  any(ckpt.removeprefix("s3://") == f for f in s3.list(ckpt.rsplit("/", 1)[0])),
                                  900, poll_s=0.5, alive=lambda: proc.poll() is None)
                    reached = progress.last_step()
                    t_fault = time.monotonic()
                    injected = ok and inject()
                    code = proc.wait(timeout=1200)
                finally:
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)
                if not injected:
                    rows.append(row(fault, "no (the run ended first, or no worker on the node)", False, None, None,
                                    progress.text()[-500:]))
                    continue
                resumed = progress.resumed(t_fault)
                finished = code == 0 and f"finished {args.steps}/{args.steps}" in progress.text()
                from_step = resumed[0][2] if resumed else 0
                # The steps trained before the restart and trained again after it. After a notice the run trains on
                # until the checkpoint, so recovery is timed to the first step past the furthest one before the restart.
                furthest = max([s for t, s in progress.steps() if not resumed or t < resumed[0][0]], default=reached)
                back = progress.passed(furthest, resumed[0][0] if resumed else t_fault)
                note = f"resumed at step {from_step} in the same run; checkpoints in S3"
                notice = PREEMPTION_LINE.search(progress.text())
                if notice:
                    note += f"; notice to checkpoint written {float(notice.group(1)):.1f} s"
                if resumed:
                    note += f"; fault to resumed {resumed[0][0] - t_fault:.1f} s"
                r = row(fault, f"{what} at step {reached}", finished and bool(resumed),
                        back - t_fault if back else None, f"{furthest - from_step} steps", note)
                r["steps_lost"] = furthest - from_step
                r["notice_to_checkpoint_s"] = float(notice.group(1)) if notice else None
                rows.append(r)
                if fault in ("S3 node loss", "S3 drain"):
                    if fault == "S3 drain":  # a drained node takes no new work: bring a fresh one
                        cluster.lose_worker_node()
                    cluster.restore_worker_node()
    finally:
        s3.stop()
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving_faults(args, model_dir: str) -> list[dict]:
    """The replica kill and the soak on one Serve app. vllm engine (the default): the engine replica (Ray Serve LLM's
    vLLM replica, behind rayft's ingress) is killed, and its memory counts vLLM's engine processes under it; hf: the
    one replica that is both."""
    import psutil
    from ray import serve

    from rayft.serve.app import start
    from rayft.serve.config import ServeConfig
    from tests.serve_helpers import ENGINE_DEPLOYMENT, ClosedLoopLoad, recovery, replica_pids

    engine = getattr(args, "serve_engine", "vllm")
    app = "rayft-reliability"
    port = free_port()
    common = dict(engine=engine, model=model_dir, model_name="tiny", port=port, num_cpus_per_replica=1,
                  max_tokens_limit=64)
    if engine == "vllm":
        cfg = ServeConfig(**common, max_model_len=512)
        deployment = ENGINE_DEPLOYMENT
    else:
        cfg = ServeConfig(**common, torch_threads=1, batch_wait_timeout_s=0.02, max_batch_size=8)
        deployment = "rayft-openai"
    start(cfg, model_dir, app_name=app)
    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"model": "tiny", "prompt": "hello", "max_tokens": args.max_tokens, "temperature": 0}
    rows = []

    def tree_rss_mib(p) -> float:
        procs = [p, *p.children(recursive=True)]
        return sum(x.memory_info().rss for x in procs if x.is_running()) / 2**20

    try:
        # -- replica kill under load
        (victim,) = replica_pids(app, deployment)
        load = ClosedLoopLoad(url, body, args.concurrency).start()
        time.sleep(5)
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        deadline = t_kill + 240
        while time.monotonic() < deadline:
            rec = recovery(load.snapshot(), t_kill)
            if rec["recovered"] and time.monotonic() - t_kill - rec["time_to_recover_s"] > 10:
                break
            time.sleep(0.5)
        records = load.stop()
        rec = recovery(records, t_kill)
        failed = [r for r in records if r[2] != 200]
        in_flight = sum(1 for r in failed if r[0] < t_kill < r[1])
        json_errors = sum(1 for r in failed if r[3].lstrip().startswith("{") and "Traceback" not in r[3])
        new = replica_pids(app, deployment)
        rows.append(row("replica kill under load",
                        f"SIGKILL to the {engine} engine replica (pid {victim}), {args.concurrency} clients",
                        rec["recovered"] and rec["failed_after_recovery"] == 0 and new and new != [victim],
                        rec["time_to_recover_s"], f"{rec['failed']} of {rec['requests']} requests",
                        f"statuses of failures {rec['failed_statuses']}, {in_flight} of them in flight at the kill, "
                        f"{json_errors} answered with a JSON error; {rec.get('ok_after_recovery', 0)} ok after "
                        f"recovery, {rec['failed_after_recovery']} failed; new replica pid {new}"))
        # -- soak
        (pid,) = replica_pids(app, deployment)
        replica = psutil.Process(pid)
        load = ClosedLoopLoad(url, body, args.concurrency).start()
        samples = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.soak_s:
            time.sleep(1.0)
            samples.append(tree_rss_mib(replica))
        records = load.stop()
        failed = [r for r in records if r[2] != 200]
        lat = sorted(r[1] - r[0] for r in records if r[2] == 200)
        q = max(1, len(samples) // 4)
        settled, end = statistics.median(samples[q:2 * q]), max(samples[-q:])
        bounded = end - settled < max(64.0, 0.1 * settled)
        rows.append(row("soak", f"{args.soak_s:.0f}s at {args.concurrency} concurrent clients ({engine} engine)",
                        not failed and bounded, None, f"{len(failed)} of {len(records)} requests",
                        f"{len(records) / args.soak_s:.1f} req/s, p50 {lat[len(lat) // 2]:.3f}s p99 "
                        f"{lat[int(len(lat) * 0.99)]:.3f}s; replica RSS (with its child processes) {settled:.0f} -> "
                        f"{end:.0f} MiB ({end - settled:+.1f})"))
    finally:
        serve.delete(app)
        serve.shutdown()
    return rows


# ---------------------------------------------------------------------------------------------------- main


def print_table(rows: list[dict]) -> None:
    print()
    head = ("fault", "injected", "recovered", "time to recover (s)", "lost")
    cells = [(r["fault"], r["injected"], "yes" if r["recovered"] else "NO",
              "-" if r["time_to_recover_s"] is None else f"{r['time_to_recover_s']:.1f}", str(r["lost"])) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))
    print()
    for r in rows:
        if r["note"]:
            print(f"- {r['fault']}: {r['note']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs and a 30 s soak")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 16, quick 12)")
    ap.add_argument("--every", type=int, default=4, help="checkpoint every N steps")
    ap.add_argument("--soak-s", type=float, default=None, help="soak duration (default 180, quick 30)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--serve-engine", choices=["vllm", "hf"], default="vllm", help="the serving cases' engine")
    ap.add_argument("--only", default="driver,worker,corrupt,storage,s3,preempt,serve",
                    help="comma-separated subset of driver,worker,corrupt,storage,s3,preempt,serve (s3: the S3 worker "
                         "kill and node loss on a two-node cluster; preempt: a drain and SIGTERM there, with the "
                         "worker kill as their baseline)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    args.steps = args.steps or (12 if args.quick else 16)
    args.soak_s = args.soak_s or (30.0 if args.quick else 180.0)
    if args.steps < 2 * args.every + 2:
        ap.error("--steps must be at least 2 x --every + 2")
    only = set(args.only.split(","))
    work = args.workdir or tempfile.mkdtemp(prefix="rayft-reliability-")
    os.makedirs(work, exist_ok=True)
    t_start = time.monotonic()

    from rayft.train.tiny_model import build_tiny_model

    model_dir = build_tiny_model(os.path.join(work, "tiny-model"))
    storage = os.path.join(work, "runs")
    rows = []
    if "driver" in only:  # first: the CLI starts its own local Ray
        print("driver kill ...", flush=True)
        rows.append(driver_kill(args, model_dir, storage))

    from rayft.cluster.config import load_config
    from rayft.cluster.ray_conn import connect
    from rayft.train.trainer import prepare_training_data

    connect(num_cpus=2)
    quiet = lambda _: None  # noqa: E731
    if only & {"worker", "corrupt", "storage"}:
        cfg = load_config(REPO / "examples" / "quickstart.yaml", overrides(args, model_dir, storage, "worker-kill"))
        data = prepare_training_data(cfg, log=quiet)
        if only & {"worker", "corrupt"}:
            print("worker kill ...", flush=True)
            rows.append(worker_kill(args, cfg, data))
        if "corrupt" in only:
            print("corrupted latest checkpoint ...", flush=True)
            rows.append(corrupted_latest(args, cfg, data))
        if "storage" in only:
            print("unwritable storage ...", flush=True)
            cfg2 = load_config(REPO / "examples" / "quickstart.yaml",
                               overrides(args, model_dir, storage, "unwritable", "train.max_failures=0"))
            rows.append(unwritable_storage(args, cfg2, data))
    if only & {"s3", "preempt"}:
        print("faults on a two-node cluster with S3 ...", flush=True)
        rows.extend(cluster_faults(args, model_dir, work, only))
        base = next((r for r in rows if r["fault"] == "S3 worker kill" and r["recovered"]), None)
        for r in rows:
            if r["fault"] not in ("S3 drain", "S3 SIGTERM") or base is None or r.get("steps_lost") is None:
                continue
            line = (f"{r['fault']}: {r['steps_lost']} step(s) lost against {base['steps_lost']} for the SIGKILL without "
                    f"notice (checkpoint every {args.every})")
            if r["time_to_recover_s"] and base["time_to_recover_s"]:
                line += (f"; time to recover {r['time_to_recover_s']} s against {base['time_to_recover_s']} s "
                         f"({r['time_to_recover_s'] / base['time_to_recover_s']:.2f}x)")
            print(line, flush=True)
    if "serve" in only:
        print("replica kill and soak ...", flush=True)
        rows.extend(serving_faults(args, model_dir))
    print_table(rows)
    print(f"\ntotal {time.monotonic() - t_start:.0f}s; work folder {work}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["recovered"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
