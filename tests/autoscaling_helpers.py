"""A local head whose autoscaler adds and removes worker nodes of cluster.yaml's types (cluster/local_autoscaler.py).

Built on tests/cluster_helpers.py's LocalCluster: the same private HOME and token, free loopback ports and stop by
process id. One `ray start --head` runs with `RAY_FAKE_CLUSTER=1` and `--autoscaling-config`; its monitor process
starts every worker node as local processes (raylet, agents) on the head's address, each with a temp dir under the
cluster's `n/` folder, so the temp-dir markers and /proc's parent links find them all.
The head's environment comes from cluster/local_autoscaler.py's `local_head_env` (loopback addresses, cluster.yaml's
autoscaler scorer).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

from rayft.cluster.local_autoscaler import HEAD_TYPE, NODE_TYPE_LABEL, local_autoscaler_config, local_head_env
from tests.cluster_helpers import RAY, LocalCluster, _alive, _children_of, _free_ports, _pids_with, _run

# How often the autoscaler looks at demand (Ray's default is 5 s).
UPDATE_INTERVAL_S = 1


class AutoscalingCluster(LocalCluster):
    """A head with cluster.yaml's worker types behind Ray's autoscaler; worker nodes come and go by demand."""

    def __init__(self, root: Path, cluster_yaml: Path, idle_timeout_minutes: float,
                 unavailable_node_types: tuple[str, ...] = ()):
        super().__init__(root)
        self.unavailable_node_types = unavailable_node_types
        self.temp_dirs = [root / "h", root / "n"]  # the head's; the worker nodes' (one folder each inside)
        self.cluster_yaml = cluster_yaml
        self.idle_timeout_minutes = idle_timeout_minutes
        self.config: dict = {}

    def start(self) -> None:
        out = _run([RAY, "get-auth-token", "--generate"], self.env, 60)
        assert out.returncode == 0, out.stderr
        self.token = (self.home / ".ray" / "auth_token").read_text().strip()
        ports = _free_ports(9)
        gcs, dash, client = ports[:3]
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.config = local_autoscaler_config(self.gcs_address, self.temp_dirs[1], self.cluster_yaml,
                                              self.idle_timeout_minutes, self.unavailable_node_types)
        config_path = self.root / "autoscaling.json"
        config_path.write_text(json.dumps(self.config, indent=1))
        head = dict(self.config["available_node_types"][HEAD_TYPE]["resources"])
        custom = {k: v for k, v in head.items() if k not in ("CPU", "GPU")}
        cmd = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
               "--num-cpus", str(int(head.get("CPU", 0))), "--num-gpus", str(int(head.get("GPU", 0))),
               *(["--resources", json.dumps(custom)] if custom else []),
               "--temp-dir", str(self.temp_dirs[0]), "--include-dashboard", "true", "--disable-usage-stats",
               "--autoscaling-config", str(config_path),
               "--node-manager-port", str(ports[3]), "--object-manager-port", str(ports[4]),
               "--metrics-export-port", str(ports[5]), "--dashboard-agent-listen-port", str(ports[6]),
               "--dashboard-agent-grpc-port", str(ports[7]), "--runtime-env-agent-port", str(ports[8])]
        env = dict(self.env, RAY_AUTH_MODE="token", AUTOSCALER_UPDATE_INTERVAL_S=str(UPDATE_INTERVAL_S),
                   **local_head_env(self.cluster_yaml))
        self._node_env = env
        self._start(cmd, env)
        self._wait_for_nodes(1)

    def nodes(self) -> list[dict]:
        """Every node the cluster has had, from the state API: node_id, node_ip, is_head, type (the cluster.yaml
        type of a worker node, from its label; the head's type for the head), state (ALIVE, DEAD), state_message
        (why a node died), resources_total."""
        req = urllib.request.Request(f"{self.dashboard}/api/v0/nodes?limit=100&detail=true",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = json.load(r)
        out = []
        for n in body["data"]["result"]["result"]:
            labels = n.get("labels") or {}
            out.append({"node_id": n["node_id"], "node_ip": n.get("node_ip"), "is_head": bool(n.get("is_head_node")),
                        "type": HEAD_TYPE if n.get("is_head_node") else labels.get(NODE_TYPE_LABEL),
                        "state": n.get("state"), "state_message": n.get("state_message") or "",
                        "resources_total": n.get("resources_total", {})})
        return out

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.nodes() if n["state"] == "ALIVE"]

    def worker_nodes(self) -> list[dict]:
        return [n for n in self.alive_nodes() if not n["is_head"]]

    def autoscaler_status(self) -> str:
        """`ray status` for this cluster (the autoscaler's view: active, pending and recently failed nodes)."""
        out = _run([RAY, "status", "--address", self.gcs_address], self._node_env, 60)
        return out.stdout + out.stderr

    def autoscaler_events(self) -> dict:
        """What the autoscaler did, from its log (the head's monitor.log): `launches`, (time_s, node type,
        requested_s) for each node it started: time_s when the provider had started it, requested_s when the
        launcher took the request; `failures`, (time_s, node type) for each launch that failed; `terminations`,
        (time_s, node id, reason, idle_s): idle_s is how long the node had been unused (whole seconds) for an idle
        termination, else None."""
        logs = [p for p in sorted(self.temp_dirs[0].glob("session_*/logs/monitor.log")) if not p.parents[1].is_symlink()]
        text = "\n".join(p.read_text(errors="replace") for p in logs)
        stamp = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"

        def when(s: str) -> float:
            return datetime.datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp()

        launches, failures, requested = [], [], {}
        pattern = (stamp + r".*(NodeLauncher\d*): (?:Got \d+ nodes to launch|Launching \d+ nodes, type (\S+)\."
                   r"|Failed to launch (?:\d+|\{\}) node\(s\) of type (\S+)\.)")
        for m in re.finditer(pattern, text, re.M):
            at, launcher, started, failed = when(m[1]), m[2], m[3], m[4]
            if started:
                launches.append((at, started, requested.pop(launcher, at)))
            elif failed:
                requested.pop(launcher, None)
                failures.append((at, failed))
            else:
                requested[launcher] = at
        terminations = []
        pattern = stamp + r".*Terminating the node with id (\S+) and ip \S+ \((\w+)\)(?:\n.*Node last used: (.+)\.)?"
        for m in re.finditer(pattern, text, re.M):
            idle_s = None
            if m[3] == "idle" and m[4]:
                last_used = datetime.datetime.strptime(m[4].strip(), "%a %b %d %H:%M:%S %Y").timestamp()
                idle_s = int(when(m[1])) - last_used
            terminations.append((when(m[1]), m[2], m[3], idle_s))
        return {"launches": launches, "failures": failures, "terminations": terminations}

    def take_worker_node(self, node_id: str) -> None:
        """What the cloud does at a reclaim's deadline: every process of that worker node SIGKILLed at once (the node
        whose temp dir is n/<N>, N the provider's node number, the end of its node id). The provider still lists
        the node until the autoscaler terminates it."""
        marker = f"{self.temp_dirs[1] / str(int(node_id[-5:]))}/"
        pids = _pids_with(marker)
        pids |= _children_of(pids)
        assert pids, f"node {node_id} has no processes"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)

    def wait_for_workers(self, count: int, timeout_s: float, poll_s: float = 1.0) -> Optional[list[dict]]:
        """Poll until exactly `count` worker nodes are alive; returns them, or None on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, KeyError):
                workers = self.worker_nodes()
                if len(workers) == count:
                    return workers
            time.sleep(poll_s)
        return None


@contextlib.contextmanager
def autoscaling_cluster(prefix: str, cluster_yaml: Path, idle_timeout_minutes: float,
                        unavailable_node_types: tuple[str, ...] = ()):
    """A started AutoscalingCluster under a short temp dir, stopped by process id and removed at the end."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    c = AutoscalingCluster(root, cluster_yaml, idle_timeout_minutes, unavailable_node_types)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


class FakeMetadataService:
    """An EC2 instance metadata service on loopback, IMDSv2 (a session token first, 401 without it): the instance's
    life cycle, and a spot reclaim notice (`spot/instance-action`) once `notice_after_polls` polls have had a 404."""

    TOKEN = "imds-session-token"

    def __init__(self, life_cycle: str = "spot", reclaim_at: str = "2026-01-01T12:02:00Z", notice_after_polls: int = 0):
        self.life_cycle, self.reclaim_at, self.notice_after_polls = life_cycle, reclaim_at, notice_after_polls
        self.polls = 0
        self.tokens_issued = 0
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: str = "") -> None:
                self.send_response(code)
                self.end_headers()
                self.wfile.write(body.encode())

            def do_PUT(self):
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    service.tokens_issued += 1
                    return self._send(200, service.TOKEN)
                self._send(400)

            def do_GET(self):
                if self.headers.get("X-aws-ec2-metadata-token") != service.TOKEN:
                    return self._send(401)
                if self.path == "/latest/meta-data/instance-life-cycle":
                    return self._send(200, service.life_cycle)
                if self.path == "/latest/meta-data/spot/instance-action":
                    service.polls += 1
                    if service.polls > service.notice_after_polls:
                        return self._send(200, json.dumps({"action": "terminate", "time": service.reclaim_at}))
                    return self._send(404)
                self._send(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
