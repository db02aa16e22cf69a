"""The spot reclaim watcher (cluster/spot_watch.py) against a fake instance metadata service on loopback that speaks
IMDSv2: a session token first, 401 without it, 404 until a reclaim is scheduled. Its drain, run against a real node,
is in tests/e2e/test_cluster_autoscaling.py."""
import pytest

from rayft.cluster.spot_watch import Metadata, drain_command, main, seconds_left, watch
from tests.autoscaling_helpers import FakeMetadataService

RECLAIM_AT = "2026-01-01T12:02:00Z"
NOW = 1767268800.0  # 2026-01-01T12:00:00Z


@pytest.fixture
def imds():
    servers = []

    def make(**kw):
        servers.append(FakeMetadataService(reclaim_at=RECLAIM_AT, **kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_a_reclaim_notice_drains_the_node_once_with_its_deadline(imds):
    server = imds(notice_after_polls=2)
    drained, slept = [], []
    result = watch(Metadata(server.url, now=lambda: NOW), drained.append, poll_s=5, sleep=slept.append,
                   log=lambda s: None)
    assert result == "drained"
    assert drained == [120]  # the notice's time minus now
    assert server.polls == 3 and slept == [5, 5]
    assert server.tokens_issued == 1  # one IMDSv2 session token, reused


def test_an_on_demand_instance_or_no_metadata_service_is_left_alone(imds):
    server = imds(life_cycle="on-demand")
    drained, lines = [], []
    assert watch(Metadata(server.url), drained.append, sleep=lambda s: None, log=lines.append) == "not-spot"
    assert server.polls == 0 and not drained and "on-demand" in lines[0]
    closed = imds()
    url = closed.url
    closed.close()
    assert watch(Metadata(url), drained.append, sleep=lambda s: None, log=lines.append) == "no-metadata"
    assert not drained


def test_deadline_and_drain_command():
    assert seconds_left({"action": "terminate", "time": RECLAIM_AT}, NOW) == 120
    assert seconds_left({"action": "terminate", "time": RECLAIM_AT}, NOW + 600) == 0
    assert seconds_left({"action": "terminate"}, NOW) == 0
    cmd = drain_command("10.0.0.1:6379", 118)
    assert cmd[:2] == ["ray", "drain-node"] and "--node-id" not in cmd
    assert cmd[cmd.index("--reason") + 1] == "DRAIN_NODE_REASON_PREEMPTION"
    assert cmd[cmd.index("--deadline-remaining-seconds") + 1] == "118"
    assert drain_command("10.0.0.1:6379", 5, "ab" * 28)[-2:] == ["--node-id", "ab" * 28]


def test_the_command_line_exits_zero_off_ec2(imds, capsys):
    server = imds(life_cycle="on-demand")
    assert main(["--address", "127.0.0.1:6379", "--metadata-url", server.url]) == 0
    assert "nothing to watch" in capsys.readouterr().out
