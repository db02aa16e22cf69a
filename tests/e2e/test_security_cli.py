"""`rayft models promote|rollback|delete` under an access policy, as a user runs them: a researcher is refused
(exit 2, naming who, the role and the action), an engineer promotes, and every decision is one audit line."""
import json
import os
import subprocess
import sys
from pathlib import Path

RAYFT = str(Path(sys.executable).with_name("rayft"))
POLICY = Path(__file__).resolve().parents[2] / "examples" / "security" / "policy.yaml"


def _registry(tmp_path):
    from mlflow.tracking import MlflowClient

    from rayft.registry.versions import register_version

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.create_experiment("rayft", artifact_location=f"file://{tmp_path}/mlartifacts")
    for loss in (2.5, 2.1):
        run = c.create_run(exp)
        folder = tmp_path / f"adapter-{loss}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
        c.log_artifacts(run.info.run_id, str(folder), artifact_path="adapter")
        register_version(uri, "bot", run.info.run_id, "adapter", {"kind": "adapter", "eval_loss": loss})
    return uri, c


def test_promote_denied_for_researcher_allowed_for_engineer(tmp_path, monkeypatch):
    uri, c = _registry(tmp_path)
    audit = tmp_path / "audit" / "audit.jsonl"
    env = dict(os.environ, RAYFT_POLICY_FILE=str(POLICY), RAYFT_AUDIT_LOG=str(audit))

    def rayft(user, *args):
        return subprocess.run([RAYFT, *args, "--tracking-uri", uri], capture_output=True, text=True, timeout=120,
                              env=dict(env, RAYFT_USER=user))

    out = rayft("carol", "models", "promote", "bot", "2")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "access denied: user 'carol' (role researcher) may not promote models:/bot/2@champion" in out.stderr
    assert "ask an admin" in out.stderr and str(POLICY) in out.stderr
    assert not (getattr(c.get_registered_model("bot"), "aliases", None) or {})  # nothing changed

    out = rayft("bob", "models", "promote", "bot", "2")
    assert out.returncode == 0, out.stderr
    assert "bot@champion -> v2" in out.stdout
    assert str(c.get_model_version_by_alias("bot", "champion").version) == "2"

    # The rest in-process through the same entry point (cluster.cli.main), to keep the test short.
    from rayft.cluster.cli import main

    monkeypatch.setenv("RAYFT_POLICY_FILE", str(POLICY))
    monkeypatch.setenv("RAYFT_AUDIT_LOG", str(audit))
    monkeypatch.setenv("RAYFT_USER", "carol")
    assert main(["models", "rollback", "bot", "--tracking-uri", uri]) == 2
    monkeypatch.setenv("RAYFT_USER", "bob")  # an engineer may not delete
    assert main(["models", "delete", "bot", "1", "--tracking-uri", uri]) == 2
    monkeypatch.setenv("RAYFT_USER", "alice")  # an admin may; the champion version itself is protected
    assert main(["models", "delete", "bot", "2", "--tracking-uri", uri]) == 2
    assert main(["models", "delete", "bot", "1", "--tracking-uri", uri]) == 0
    assert [str(v.version) for v in c.search_model_versions("name = 'bot'")] == ["2"]

    got = [json.loads(x) for x in audit.read_text().splitlines()]
    assert [(x["who"], x["role"], x["action"], x["outcome"]) for x in got] == [
        ("carol", "researcher", "promote", "denied"),
        ("bob", "engineer", "promote", "allowed"),
        ("carol", "researcher", "rollback", "denied"),
        ("bob", "engineer", "delete", "denied"),
        ("alice", "admin", "delete", "allowed"),  # allowed by the policy, then refused by the registry
        ("alice", "admin", "delete", "allowed"),
    ]
    assert got[0]["target"] == "models:/bot/2@champion" and got[0]["source"] == "cli"
    assert all(x["ts"].endswith("Z") for x in got)
    assert "mlflow.db" not in audit.read_text()  # targets name models, not stores


def test_run_checks_every_action_before_it_starts(tmp_path):
    """`rayft run` trains (or tunes), promotes and, with --serve, deploys: a user who may train but not promote is
    refused before any data is read or Ray starts, and each decision is audited."""
    repo = Path(__file__).resolve().parents[2]
    audit = tmp_path / "audit.jsonl"
    env = dict(os.environ, RAYFT_POLICY_FILE=str(POLICY), RAYFT_AUDIT_LOG=str(audit))
    # carol (researcher) may tune but not promote; the quickstart's search would promote its best trial.
    out = subprocess.run([RAYFT, "run", "examples/quickstart.yaml", "--set", f"storage_path={tmp_path}/runs"],
                         cwd=repo, capture_output=True, text=True, timeout=120, env=dict(env, RAYFT_USER="carol"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "user 'carol' (role researcher) may not promote models:/quickstart@champion" in out.stderr, out.stderr
    assert "started a local Ray" not in out.stdout and not (tmp_path / "runs").exists()
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(x["action"], x["outcome"]) for x in lines] == [("tune", "allowed"), ("promote", "denied")], lines
    # --promote never: nothing to promote, but --serve deploys, which a researcher may not do either.
    out = subprocess.run([RAYFT, "run", "examples/quickstart.yaml", "--promote", "never", "--serve",
                          "--set", f"storage_path={tmp_path}/runs"], cwd=repo, capture_output=True, text=True,
                         timeout=120, env=dict(env, RAYFT_USER="carol"))
    assert out.returncode == 2 and "may not deploy" in out.stderr, out.stdout + out.stderr


def test_run_promote_never_reaches_the_search(tmp_path, tiny_model_dir):
    """`rayft run FILE --promote never` on a config with a `tune:` section: the search's crowning honours the
    flag (the version stays `challenger`), so a user who may tune but not promote cannot promote this way."""
    import yaml
    from mlflow.tracking import MlflowClient

    repo = Path(__file__).resolve().parents[2]
    cfg = yaml.safe_load((repo / "examples" / "quickstart.yaml").read_text())
    cfg["model"]["name_or_path"] = str(tiny_model_dir)
    cfg["storage_path"] = str(tmp_path / "runs")
    cfg["name"] = "never"
    cfg["data"]["max_seq_length"] = 256
    cfg["train"].update({"num_workers": 1, "max_steps": 2, "eval_every_n_steps": 2, "save_every_n_steps": 2,
                         "warmup_steps": 0, "micro_batch_size": 4})
    cfg["tune"] = {"num_samples": 1, "search_space": {"train.learning_rate": {"grid": [5e-3]}},
                   "asha": {"grace_period_steps": 2, "reduction_factor": 2}, "max_concurrent_trials": 1,
                   "promotion": {"policy": "always"}}  # --promote must win over the config's policy
    path = tmp_path / "never.yaml"
    path.write_text(yaml.safe_dump(cfg))
    audit = tmp_path / "audit.jsonl"
    env = dict(os.environ, RAYFT_POLICY_FILE=str(POLICY), RAYFT_AUDIT_LOG=str(audit), RAYFT_USER="carol")
    out = subprocess.run([RAYFT, "run", str(path), "--promote", "never"], cwd=repo, capture_output=True, text=True,
                         timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    uri = f"sqlite:///{tmp_path}/runs/mlflow.db"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    aliases = dict(getattr(c.get_registered_model("never"), "aliases", None) or {})
    assert "champion" not in aliases and str(aliases.get("challenger")) == "1", (aliases, out.stdout[-2000:])
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(x["action"], x["outcome"]) for x in lines] == [("tune", "allowed")], lines
