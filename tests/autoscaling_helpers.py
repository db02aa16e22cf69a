"""A local head whose autoscaler adds and removes worker nodes of cluster.yaml's types (cluster/local_autoscaler.py).

Built on tests/cluster_helpers.py's LocalCluster: the same private HOME and token, free loopback ports and stop by
process id. One `ray start --head` runs with `RAY_FAKE_CLUSTER=1` and `--autoscaling-config`; its monitor process
starts every worker node as local processes (raylet, agents) on the head's address, each with a temp dir under the
cluster's `n/` folder, so the temp-dir markers and /proc's parent links find them all.
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` keeps the head on 127.0.0.1: otherwise `ray start` turns a loopback
`--node-ip-address` into the machine's routed address (`resolve_ip_for_localhost`).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import re
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

from rayft.cluster.local_autoscaler import HEAD_TYPE, NODE_TYPE_LABEL, local_autoscaler_config
from tests.cluster_helpers import RAY, LocalCluster, _free_ports, _run

# How often the autoscaler looks at demand (Ray's default is 5 s).
UPDATE_INTERVAL_S = 1


class AutoscalingCluster(LocalCluster):
    """A head with cluster.yaml's worker types behind Ray's autoscaler; worker nodes come and go by demand."""

    def __init__(self, root: Path, cluster_yaml: Path, idle_timeout_minutes: float):
        super().__init__(root)
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
                                              self.idle_timeout_minutes)
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
        env = dict(self.env, RAY_AUTH_MODE="token", RAY_FAKE_CLUSTER="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                   AUTOSCALER_UPDATE_INTERVAL_S=str(UPDATE_INTERVAL_S))
        self._node_env = env
        self._start(cmd, env)
        self._wait_for_nodes(1)

    def alive_nodes(self) -> list[dict]:
        """Alive nodes from the state API: node_id, node_ip, is_head, type (the cluster.yaml type of a worker
        node, from its label; the head's type for the head), resources_total."""
        req = urllib.request.Request(f"{self.dashboard}/api/v0/nodes?limit=100&detail=true",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = json.load(r)
        out = []
        for n in body["data"]["result"]["result"]:
            if n.get("state") != "ALIVE":
                continue
            labels = n.get("labels") or {}
            out.append({"node_id": n["node_id"], "node_ip": n.get("node_ip"), "is_head": bool(n.get("is_head_node")),
                        "type": HEAD_TYPE if n.get("is_head_node") else labels.get(NODE_TYPE_LABEL),
                        "resources_total": n.get("resources_total", {})})
        return out

    def worker_nodes(self) -> list[dict]:
        return [n for n in self.alive_nodes() if not n["is_head"]]

    def autoscaler_status(self) -> str:
        """`ray status` for this cluster (the autoscaler's view: active, pending and recently failed nodes)."""
        out = _run([RAY, "status", "--address", self.gcs_address], self._node_env, 60)
        return out.stdout + out.stderr

    def autoscaler_events(self) -> dict:
        """What the autoscaler did, from its log (the head's monitor.log): `launches`, (time_s, node type) for
        each node it launched; `failures`, (time_s, node type) for each launch that failed; `terminations`,
        (time_s, node id, reason, idle_s): idle_s is how long the node had been unused (whole seconds) for an idle
        termination, else None."""
        logs = [p for p in sorted(self.temp_dirs[0].glob("session_*/logs/monitor.log")) if not p.parents[1].is_symlink()]
        text = "\n".join(p.read_text(errors="replace") for p in logs)
        stamp = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"

        def when(s: str) -> float:
            return datetime.datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp()

        launches = [(when(m[1]), m[2]) for m in re.finditer(stamp + r".*Launching \d+ nodes, type (\S+)\.", text, re.M)]
        failures = [(when(m[1]), m[2]) for m in re.finditer(stamp + r".*Failed to launch \d+ node\(s\) of type (\S+)\.",
                                                            text, re.M)]
        terminations = []
        pattern = stamp + r".*Terminating the node with id (\S+) and ip \S+ \((\w+)\)(?:\n.*Node last used: (.+)\.)?"
        for m in re.finditer(pattern, text, re.M):
            idle_s = None
            if m[3] == "idle" and m[4]:
                last_used = datetime.datetime.strptime(m[4].strip(), "%a %b %d %H:%M:%S %Y").timestamp()
                idle_s = int(when(m[1])) - last_used
            terminations.append((when(m[1]), m[2], m[3], idle_s))
        return {"launches": launches, "failures": failures, "terminations": terminations}

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
def autoscaling_cluster(prefix: str, cluster_yaml: Path, idle_timeout_minutes: float):
    """A started AutoscalingCluster under a short temp dir, stopped by process id and removed at the end."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    c = AutoscalingCluster(root, cluster_yaml, idle_timeout_minutes)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)
