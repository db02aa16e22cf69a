"""On a spot node: the cloud's reclaim warning, turned into a Ray drain of this node with its deadline.

AWS announces a spot reclaim about two minutes ahead, only through the instance metadata service
(`spot/instance-action`); nothing in Ray reads it, and the shutdown that follows gives the processes in the container
a few seconds at most. `python -m rayft.cluster.spot_watch --address HEAD:6379` (started on every worker node by
cluster.yaml, after `ray start`) polls that endpoint and, when a reclaim is scheduled, runs
`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N` for this node. Ray then stops
placing work there, and Ray Train tells its workers on the node: a rayft training run checkpoints at the next step
boundary and resumes from that checkpoint on the nodes left or on a replacement (train/preemption.py).

On an on-demand instance, or off EC2 (no metadata service), it says so and exits. It speaks IMDSv2 (a session token
first), which every current AMI accepts and many require.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Callable, Optional

IMDS_URL = "http://169.254.169.254"
TOKEN_TTL_S = 21600
# The actions of a spot interruption notice; all of them take the node away.
RECLAIM_ACTIONS = ("terminate", "stop", "hibernate")


class MetadataUnavailable(Exception):
    """No instance metadata service answers (not on EC2, or blocked)."""


def _request(url: str, method: str = "GET", headers: Optional[dict] = None, timeout_s: float = 2.0) -> Optional[str]:
    """The body, or None for a 404 (the metadata service's answer for "nothing scheduled")."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.read().decode()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise MetadataUnavailable(f"{method} {url}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise MetadataUnavailable(f"{method} {url}: {e}") from None


class Metadata:
    """The instance metadata service, IMDSv2: a session token, refreshed before it expires."""

    def __init__(self, base_url: str = IMDS_URL, now: Callable[[], float] = time.time):
        self.base_url = base_url.rstrip("/")
        self.now = now
        self._token: Optional[str] = None
        self._token_until = 0.0

    def _headers(self) -> dict:
        if self._token is None or self.now() > self._token_until:
            self._token = _request(f"{self.base_url}/latest/api/token", "PUT",
                                   {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
            if not self._token:
                raise MetadataUnavailable("the metadata service gave no session token")
            self._token_until = self.now() + TOKEN_TTL_S - 60
        return {"X-aws-ec2-metadata-token": self._token}

    def get(self, path: str) -> Optional[str]:
        return _request(f"{self.base_url}/latest/meta-data/{path}", headers=self._headers())

    def life_cycle(self) -> str:
        """`spot` or `on-demand`."""
        return (self.get("instance-life-cycle") or "").strip()

    def instance_action(self) -> Optional[dict]:
        """The scheduled reclaim, `{"action": "terminate", "time": "2026-01-01T12:00:00Z"}`, or None."""
        body = self.get("spot/instance-action")
        return json.loads(body) if body else None


def seconds_left(action: dict, now: float) -> int:
    """Whole seconds from `now` to the reclaim time of an instance-action notice (0 when past or unreadable)."""
    try:
        at = datetime.datetime.strptime(action["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    except (KeyError, TypeError, ValueError):
        return 0
    return max(0, int(at.timestamp() - now))


def drain_command(address: str, deadline_s: int, node_id: Optional[str] = None) -> list[str]:
    """`ray drain-node` for this node (or `node_id`) with a preemption reason and the reclaim deadline."""
    cmd = ["ray", "drain-node", "--address", address, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
           "--reason-message", f"spot instance reclaimed by the cloud in {deadline_s} s",
           "--deadline-remaining-seconds", str(deadline_s)]
    return cmd + (["--node-id", node_id] if node_id else [])


def watch(metadata: Metadata, drain: Callable[[int], None], poll_s: float = 5.0,
          sleep: Callable[[float], None] = time.sleep, log: Callable[[str], None] = print) -> str:
    """Poll until a reclaim is announced, then drain once. Returns what happened: `drained`, `not-spot` or
    `no-metadata`."""
    try:
        cycle = metadata.life_cycle()
    except MetadataUnavailable as e:
        log(f"spot_watch: no instance metadata ({e}); nothing to watch")
        return "no-metadata"
    if cycle != "spot":
        log(f"spot_watch: this instance is {cycle or 'not spot'}; nothing to watch")
        return "not-spot"
    log(f"spot_watch: spot instance; polling {metadata.base_url} every {poll_s:g} s for a reclaim notice")
    while True:
        try:
            action = metadata.instance_action()
        except MetadataUnavailable as e:  # a hiccup of the service: keep watching
            log(f"spot_watch: {e}; retrying")
            action = None
        if action and action.get("action") in RECLAIM_ACTIONS:
            left = seconds_left(action, metadata.now())
            log(f"spot_watch: reclaim notice {json.dumps(action)}: draining this node, deadline in {left} s")
            drain(left)
            return "drained"
        sleep(poll_s)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rayft.cluster.spot_watch", description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True, help="the head's GCS address, HOST:6379")
    p.add_argument("--node-id", help="the node to drain (default: this machine's node)")
    p.add_argument("--poll-s", type=float, default=5.0, help="seconds between metadata polls (default 5)")
    p.add_argument("--metadata-url", default=IMDS_URL, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    def drain(deadline_s: int) -> None:
        out = subprocess.run(drain_command(args.address, deadline_s, args.node_id), capture_output=True, text=True)
        print(f"spot_watch: ray drain-node exit {out.returncode} {out.stdout.strip()} {out.stderr.strip()[-2000:]}")

    watch(Metadata(args.metadata_url), drain, poll_s=args.poll_s, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
