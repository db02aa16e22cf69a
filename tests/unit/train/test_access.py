"""Access policy and audit log: decisions per role, one JSON line per decision, no secrets, clear policy errors."""
import json
from pathlib import Path

import pytest

from rayft.cluster.access import require
from rayft.security.access import AccessDenied, AuditLog, PolicyError, authorize, decide, load_policy, scrub
from rayft.security.config import SecurityConfig

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "security" / "policy.yaml"


def lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_shipped_policy_parses_and_grants_by_role():
    p = load_policy(str(EXAMPLE))
    assert decide(p, "alice", "delete", "models:/bot/1").allowed  # admin: "*"
    assert decide(p, "bob", "promote", "models:/bot/1").allowed
    assert not decide(p, "bob", "delete", "models:/bot/1").allowed
    d = decide(p, "carol", "promote", "models:/bot/1@champion")
    assert not d.allowed and d.role == "researcher" and "allows only infer, train, tune" in d.reason
    assert "carol" in d.explain() and "researcher" in d.explain() and "promote" in d.explain()
    assert not decide(p, "mallory", "train", "run x").allowed  # not listed, no default_role
    assert decide(p, "acme", "infer", "m", kind="tenant").allowed
    assert not decide(p, "acme", "deploy", "m", kind="tenant").allowed
    assert not decide(p, "alice", "infer", "m", kind="tenant").allowed  # users and tenants are separate tables


@pytest.mark.parametrize("text,expected", [
    ("roles: {admin: [trian]}\n", r"roles\.admin\.0: 'trian' is not an action"),
    ("roles: {admin: ['*']}\nusers: {bob: enginer}\n", r"users\.bob: role 'enginer' is not defined under roles"),
    ("roles: {admin: ['*']}\ngroups: {}\n", r"groups: unknown field"),
    ("roles: {admin: ['*']}\ndefault_role: guest\n", r"default_role: 'guest' is not defined"),
    ("- admin\n", "the top level must be a mapping"),
])
def test_policy_errors_name_the_field(tmp_path, text, expected):
    f = tmp_path / "policy.yaml"
    f.write_text(text)
    with pytest.raises(PolicyError, match=expected):
        load_policy(str(f))


def test_audit_line_per_decision_and_no_secrets(tmp_path, monkeypatch):
    audit = tmp_path / "logs" / "audit.jsonl"
    policy = load_policy(str(EXAMPLE))
    monkeypatch.setenv("RAYFT_USER", "carol")
    log = AuditLog(str(audit))
    authorize(policy, "carol", "promote", "models:/bot/2@champion", log)
    authorize(policy, "bob", "promote", "models:/bot/2@champion", log)
    authorize(None, "bob", "deploy", "https://user:s3cr3t@mlflow.example.com/models?token=abc123", log)
    log.close()
    got = lines(audit)
    assert [x["outcome"] for x in got] == ["denied", "allowed", "allowed"]
    assert got[0]["who"] == "carol" and got[0]["role"] == "researcher" and got[0]["action"] == "promote"
    assert got[0]["target"] == "models:/bot/2@champion" and got[0]["source"] == "cli"
    assert set(got[0]) >= {"ts", "who", "role", "action", "target", "outcome", "reason"}
    assert got[2]["reason"].startswith("no policy file")
    text = audit.read_text()
    assert "s3cr3t" not in text and "abc123" not in text
    assert oct(audit.stat().st_mode & 0o777) == "0o600"


def test_scrub():
    assert scrub("s3://bucket/x?X-Amz-Signature=zz") == "s3://bucket/x"
    assert scrub("https://u:p@host/a") == "https://host/a"
    assert scrub("models:/bot@champion") == "models:/bot@champion"


def test_require_reads_security_section_and_env(tmp_path, monkeypatch):
    audit = tmp_path / "audit.jsonl"
    sec = SecurityConfig(policy_file=str(EXAMPLE), audit_log=str(audit))
    monkeypatch.setenv("RAYFT_USER", "carol")
    with pytest.raises(AccessDenied, match=r"user 'carol' \(role researcher\) may not rollback"):
        require(sec, "rollback", "models:/bot@champion")
    monkeypatch.setenv("RAYFT_USER", "bob")
    assert require(sec, "rollback", "models:/bot@champion").allowed
    # no policy anywhere: allowed, and still audited when RAYFT_AUDIT_LOG is set
    monkeypatch.delenv("RAYFT_POLICY_FILE", raising=False)
    monkeypatch.setenv("RAYFT_AUDIT_LOG", str(audit))
    assert require(None, "delete", "models:/bot/1").allowed
    assert [x["outcome"] for x in lines(audit)] == ["denied", "allowed", "allowed"]
    monkeypatch.setenv("RAYFT_POLICY_FILE", str(EXAMPLE))
    with pytest.raises(AccessDenied):
        require(None, "delete", "models:/bot/1")  # bob is an engineer
