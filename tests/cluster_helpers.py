"""A two-node Ray cluster on this machine for end-to-end tests: `ray start --head` plus a second `ray start
--address` node, every port a free loopback port, each node with its own short temp dir, HOME pointed at a private
folder (the token, logs and sessions of the user's own Ray are never touched), token authentication on. The nodes
are stopped by the process ids of what they started (found by their private temp dirs in /proc), never `ray stop`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pids_with(marker: str) -> set[int]:
    """Processes whose command line mentions `marker` (a temp dir only this test's nodes use)."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    out.add(int(entry))
        except OSError:
            continue
    return out


def _children_of(pids: set[int]) -> set[int]:
    """Every descendant of `pids` (workers, job drivers), by walking /proc's parent links."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), set(pids)
    while frontier:
        nxt = {p for p, pp in parent.items() if pp in frontier and p not in found}
        found |= nxt
        frontier = nxt
    return found


def ray_train_workers(pids: set[int]) -> list[int]:
    """Those of `pids` that are Ray Train worker processes (their title names RayTrainWorker)."""
    found = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"RayTrainWorker" in f.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def _kill(pids: set[int], timeout_s: float = 5) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        if not any(_alive(p) for p in pids):
            return


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _torch_extensions_dir() -> str:
    """Where torch keeps JIT-built extensions for this user and build (its default, spelled out)."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    accel = "cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}"
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(get_default_build_root(), f"{py}_{accel}")


def _run(cmd, env, timeout_s, cwd=None):
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)


class LocalCluster:
    """Two `ray start` nodes on 127.0.0.1 with private temp dirs, a private HOME and token auth."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "home"
        self.home.mkdir()
        self.temp_dirs = [root / "h", root / "w"]
        self.pids: set[int] = set()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_", "RAYFT_")) and k not in ("MLFLOW_TRACKING_URI",)}
        # Caches stay the user's (DeepSpeed's JIT-built ops, font and model caches): a private HOME would rebuild
        # them in the first job. Only Ray's token and sessions are private.
        env.setdefault("TORCH_EXTENSIONS_DIR", _torch_extensions_dir())
        env.setdefault("XDG_CACHE_HOME", str(Path.home() / ".cache"))
        env.update(HOME=str(self.home), PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
                   DS_ACCELERATOR="cpu", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
                   RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
        self.env = env
        self.dashboard = None

    def start(self) -> None:
        out = _run([RAY, "get-auth-token", "--generate"], self.env, 60)
        assert out.returncode == 0, out.stderr
        self.token = (self.home / ".ray" / "auth_token").read_text().strip()
        assert self.token
        node_env = dict(self.env, RAY_AUTH_MODE="token")
        ports = _free_ports(2 * 28)
        gcs, dash, client = ports[:3]
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.gcs_address = f"127.0.0.1:{gcs}"  # what a driver joins (ray.address), with RAY_AUTH_MODE=token

        def node_ports(p):
            return ["--node-manager-port", str(p[0]), "--object-manager-port", str(p[1]),
                    "--metrics-export-port", str(p[2]), "--dashboard-agent-listen-port", str(p[3]),
                    "--dashboard-agent-grpc-port", str(p[4]), "--runtime-env-agent-port", str(p[5]),
                    "--worker-port-list", ",".join(str(x) for x in p[6:26])]

        head = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
                "--num-cpus", "2", "--num-gpus", "0", "--temp-dir", str(self.temp_dirs[0]),
                "--include-dashboard", "true", "--disable-usage-stats", *node_ports(ports[3:29])]
        self._start(head, node_env)
        worker = [RAY, "start", "--address", f"127.0.0.1:{gcs}", "--node-ip-address", "127.0.0.1",
                  "--num-cpus", "1", "--num-gpus", "0", "--temp-dir", str(self.temp_dirs[1]),
                  "--disable-usage-stats", *node_ports(ports[29:55])]
        self._worker_cmd, self._node_env = worker, node_env
        self._start(worker, node_env)
        self._wait_for_nodes(2)

    def worker_node_pids(self) -> set[int]:
        """The worker node's processes: its raylet and agents (by its temp dir) and every process they started."""
        pids = _pids_with(str(self.temp_dirs[1]))
        return pids | _children_of(pids)

    def lose_worker_node(self) -> None:
        """Node loss: every process of the worker node SIGKILLed at once, as when a machine disappears."""
        pids = self.worker_node_pids()
        assert pids, "the worker node has no processes"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)

    def worker_node_id(self) -> str:
        """The alive worker node's Ray node id (hex), from the dashboard."""
        alive = [r for r in self._raylets() if r.get("state") == "ALIVE" and not r.get("isHeadNode")]
        assert len(alive) == 1, f"expected one alive worker node, found {alive}"
        return alive[0]["nodeId"]

    def drain_worker_node(self, deadline_s: int, reason: str = "spot instance reclaim (test)") -> None:
        """A preemption notice, as the autoscaler or a cloud integration sends it: the GCS marks the worker node
        draining, with the time left before it is taken. The node itself keeps running (`lose_worker_node` takes
        it, `restore_worker_node` brings a fresh one)."""
        out = _run([RAY, "drain-node", "--address", self.gcs_address, "--node-id", self.worker_node_id(),
                    "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", reason,
                    "--deadline-remaining-seconds", str(deadline_s)], self._node_env, 60)
        assert out.returncode == 0, f"ray drain-node: {out.stdout[-2000:]}\n{out.stderr[-2000:]}"

    def restore_worker_node(self) -> None:
        """A fresh worker node with the same ports and temp dir (after `lose_worker_node`)."""
        self._start(self._worker_cmd, self._node_env)
        self._wait_for_nodes(2)

    def _start(self, cmd, env) -> None:
        try:
            out = _run(cmd, env, 120)
        finally:
            self.pids |= self.node_pids()
        assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"

    def node_pids(self) -> set[int]:
        found = set()
        for d in self.temp_dirs:
            found |= _pids_with(str(d))
        return found

    def _raylets(self) -> list[dict]:
        req = urllib.request.Request(f"{self.dashboard}/nodes?view=summary",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return [x.get("raylet", {}) for x in json.load(r)["data"]["summary"]]

    def _wait_for_nodes(self, n: int, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            try:
                alive = [r for r in self._raylets() if r.get("state") == "ALIVE"]
                if len(alive) >= n:
                    return
                last = f"{len(alive)} node(s) alive"
            except (OSError, ValueError, KeyError) as e:
                last = repr(e)
            time.sleep(1)
        raise AssertionError(f"the cluster did not reach {n} nodes in {timeout_s}s ({last})")

    def stop(self) -> None:
        pids = self.pids | self.node_pids()
        pids |= _children_of(pids)
        _kill(pids)
        left = [p for p in pids if _alive(p)]
        assert not left, f"processes still alive after SIGKILL: {left}"


@contextlib.contextmanager
def two_node_cluster(prefix: str):
    """A started LocalCluster under a short temp dir (Ray's unix socket paths have a length limit), stopped and
    removed at the end."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    c = LocalCluster(root)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)
