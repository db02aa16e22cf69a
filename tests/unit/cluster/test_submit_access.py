"""`rayft submit` checks the access policy for the command inside the job before it connects or uploads anything,
the job runs as (and its audit lines name) the user who submitted it, and `--env RAYFT_USER` is refused.
No cluster: a refusal happens before connecting, and the address given answers nothing."""
import json
import shlex
import shutil
import socket
from pathlib import Path

import pytest

from rayft.cluster.cli import main

ROOT = Path(__file__).resolve().parents[3]
POLICY = ROOT / "examples" / "security" / "policy.yaml"


def _dead_address() -> str:
    with socket.socket() as s:  # a port nothing listens on once the socket is closed
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder holding the quickstart config (as `rayft submit` runs from one), a policy and an audit log."""
    shutil.copy(ROOT / "examples" / "quickstart.yaml", tmp_path / "run.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAYFT_POLICY_FILE", str(POLICY))
    monkeypatch.setenv("RAYFT_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.delenv("RAYFT_SUBMITTED_BY", raising=False)
    return tmp_path


def _audit(project) -> list[dict]:
    path = project / "audit.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_submit_refuses_what_the_policy_denies_before_connecting(project, monkeypatch, capsys):
    monkeypatch.setenv("RAYFT_USER", "carol")  # researcher: train, tune, infer
    address = _dead_address()
    assert main(["submit", "run.yaml", "--address", address, "--", "serve"]) == 2
    err = capsys.readouterr().err
    assert "user 'carol' (role researcher) may not deploy" in err, err
    # the quickstart's search would crown a champion: `run` needs promote as well
    assert main(["submit", "run.yaml", "--address", address, "--", "run"]) == 2
    err = capsys.readouterr().err
    assert "may not promote models:/quickstart@champion" in err, err
    assert main(["submit", "run.yaml", "--address", address, "--", "run", "--promote", "never", "--serve"]) == 2
    assert "may not deploy" in capsys.readouterr().err
    assert not (project / ".rayft").exists()  # nothing was staged for upload
    got = [(x["action"], x["outcome"], x["source"]) for x in _audit(project)]
    assert got == [("deploy", "denied", "submit"), ("tune", "allowed", "submit"), ("promote", "denied", "submit"),
                   ("tune", "allowed", "submit"), ("deploy", "denied", "submit")], got

    # What the policy allows gets as far as connecting (and fails there: nothing answers at that address).
    assert main(["submit", "run.yaml", "--address", address, "--", "run", "--promote", "never"]) == 2
    assert "no Ray job API answers there" in capsys.readouterr().err
    monkeypatch.setenv("RAYFT_USER", "bob")  # engineer: may promote and deploy
    assert main(["submit", "run.yaml", "--address", address, "--", "run", "--serve"]) == 2
    assert "no Ray job API answers there" in capsys.readouterr().err
    assert [x["outcome"] for x in _audit(project)[5:]] == ["allowed"] * 4


def test_the_job_runs_as_the_submitter_and_rayft_user_cannot_be_passed(project, monkeypatch, capsys):
    monkeypatch.setenv("RAYFT_USER", "bob")
    assert main(["submit", "run.yaml", "--address", _dead_address(), "--env", "RAYFT_USER=alice", "--", "train"]) == 2
    assert "--env RAYFT_USER=...: a job runs as the user who submits it" in capsys.readouterr().err
    assert main(["submit", "run.yaml", "--dry-run", "--env", "A=1", "--", "train"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("ray job submit "))
    words = shlex.split(line)
    env = json.loads(words[words.index("--runtime-env-json") + 1])["env_vars"]
    assert env == {"A": "1", "RAYFT_USER": "bob", "RAYFT_SUBMITTED_BY": "bob"}


def test_every_audit_line_of_a_submitted_job_names_the_submitter(tmp_path, monkeypatch):
    """Inside the job (RAYFT_SUBMITTED_BY set by rayft submit), CLI decisions carry `submitted_by`; so do those of a
    serving replica, which gets it from its driver."""
    from rayft.cluster.access import require
    from rayft.security.access import AuditLog, authorize, load_policy
    from rayft.security.config import SecurityConfig

    audit = tmp_path / "audit.jsonl"
    sec = SecurityConfig(policy_file=str(POLICY), audit_log=str(audit))
    monkeypatch.setenv("RAYFT_USER", "bob")
    monkeypatch.setenv("RAYFT_SUBMITTED_BY", "bob")
    require(sec, "train", "run quickstart")
    monkeypatch.delenv("RAYFT_SUBMITTED_BY")
    require(sec, "train", "run quickstart")  # not in a job: no field
    log = AuditLog(str(audit), submitted_by="bob")
    authorize(load_policy(str(POLICY)), "acme", "infer", "tiny", log, kind="tenant", source="server")
    log.close()
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    assert [x.get("submitted_by") for x in lines] == ["bob", None, "bob"], lines
