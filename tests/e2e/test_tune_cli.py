"""`rayft tune` as a user runs it: a subprocess on a small search over the tiny model.

Four trials, two with clearly bad learning rates; the driver is killed once two trials have finished and
the search is resumed with --resume. Checks: ASHA stopped at least one trial early, finished trials were
not run again, the champion is the trial with the lowest eval loss, and the registry holds it as
`champion` with the trial's eval loss; MLflow has one parent run with one child run per trial.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

RAYFT = str(Path(sys.executable).with_name("rayft"))
LEARNING_RATES = [1e-2, 5e-3, 2.0, 1e-7]  # the last two are bad: diverging and frozen


def _write_config(repo_root, tiny_model_dir, storage) -> Path:
    cfg = yaml.safe_load((Path(repo_root) / "examples" / "quickstart.yaml").read_text())
    cfg["model"]["name_or_path"] = str(tiny_model_dir)
    cfg["storage_path"] = str(storage)
    cfg["name"] = "tq"
    cfg["data"]["max_seq_length"] = 256
    cfg["train"].update({"num_workers": 1, "max_steps": 8, "eval_every_n_steps": 2, "save_every_n_steps": 2,
                         "logging_every_n_steps": 2, "warmup_steps": 0, "lr_schedule": "constant",
                         "micro_batch_size": 4})
    cfg["train"]["lora"].update({"rank": 4, "alpha": 8})
    cfg["tune"] = {"num_samples": 1,
                   "search_space": {"train.learning_rate": {"grid": LEARNING_RATES}},
                   "asha": {"grace_period_steps": 2, "reduction_factor": 2},
                   "max_concurrent_trials": 2}
    path = Path(storage) / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _finished_trials(search_dir) -> list[str]:
    """Trial ids Tune has recorded as done (its result.json ends with a `done: true` result)."""
    done = []
    for f in Path(search_dir).glob("_trial_driver_*/result.json"):
        lines = [line for line in f.read_text().splitlines() if line.strip()]
        if lines and json.loads(lines[-1]).get("done"):
            done.append(json.loads(lines[-1])["trial_id"])
    return sorted(done)


def _snapshot(search_dir, trial_ids) -> dict:
    """Every file of these trials' run folders with its modification time."""
    out = {}
    for t in trial_ids:
        for p in (Path(search_dir) / "trials" / f"trial-{t}").rglob("*"):
            if p.is_file():
                out[str(p)] = p.stat().st_mtime
    return out


@pytest.fixture(scope="module")
def search(repo_root, tiny_model_dir, tmp_path_factory):
    storage = tmp_path_factory.mktemp("tune-runs")
    config = _write_config(repo_root, tiny_model_dir, storage)
    search_dir = storage / "tq-search"
    log1 = open(storage / "first.log", "w")
    proc = subprocess.Popen([RAYFT, "tune", str(config)], cwd=repo_root, stdout=log1, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 600
    killed = False
    while time.time() < deadline and proc.poll() is None:
        if len(_finished_trials(search_dir)) >= 2:
            time.sleep(3)  # let Tune write its experiment state
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            killed = True
            break
        time.sleep(0.5)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    log1.close()
    finished_ids = _finished_trials(search_dir)
    finished_before = _snapshot(search_dir, finished_ids)
    out = subprocess.run([RAYFT, "tune", str(config), "--resume"], cwd=repo_root, capture_output=True, text=True,
                         timeout=900)
    (storage / "resume.log").write_text(out.stdout + out.stderr)
    return {"storage": storage, "search_dir": search_dir, "killed": killed, "finished_before": finished_before,
            "finished_ids": finished_ids,
            "resume": out, "first_log": (storage / "first.log").read_text()}


def test_search_resumes_and_finishes(search):
    r = search["resume"]
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert search["killed"], "the first search finished before it could be interrupted:\n" + search["first_log"][-3000:]
    assert "resuming the search" in r.stdout
    # Trials that had finished before the interruption were not run again: their run folders are untouched.
    assert len(search["finished_ids"]) >= 2 and search["finished_before"]
    after = _snapshot(search["search_dir"], search["finished_ids"])
    assert after == search["finished_before"], "a finished trial ran again"
    assert len(_finished_trials(search["search_dir"])) == len(LEARNING_RATES)


def test_asha_stops_bad_trials_and_crowns_the_best(search):
    out = search["resume"].stdout
    assert "stopped early" in out and "compute:" in out
    table = [line.split() for line in out.splitlines() if line[:1].isalnum() and len(line.split()) >= 5]
    rows = [t for t in table if t[-2] in ("yes", "no")]
    assert len(rows) == len(LEARNING_RATES), out
    assert any(t[-2] == "yes" for t in rows), "ASHA stopped no trial:\n" + out
    losses = {t[0]: float(t[2]) for t in rows if t[2] != "-"}
    best_id = min(losses, key=losses.get)
    assert f"best: trial {best_id}" in out
    # The winner is one of the two good learning rates.
    best_row = next(t for t in rows if t[0] == best_id)
    assert float(best_row[1]) in (1e-2, 5e-3)


def test_registry_holds_champion_with_its_eval_loss(search):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{search['storage']}/mlflow.db"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champ = c.get_model_version_by_alias("tq", "champion")
    chall = c.get_model_version_by_alias("tq", "challenger")
    assert champ.version == chall.version
    out = search["resume"].stdout
    best_loss = float(out.split("(eval loss ")[1].split(")")[0])
    assert abs(float(champ.tags["eval_loss"]) - best_loss) < 1e-3
    merged = Path(search["search_dir"]) / "export" / "merged"
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    # One parent run for the search, one nested child run per trial.
    exp = c.get_experiment_by_name("rayft")
    runs = c.search_runs([exp.experiment_id], max_results=100)
    parent = [x for x in runs if x.data.tags.get("rayft.kind") == "search"]
    assert len(parent) == 1
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len({x.data.tags.get("rayft.run") for x in children}) == len(LEARNING_RATES)


@pytest.mark.parametrize("space,message", [
    ({"lora.rnak": {"choice": [4, 8]}}, "'train.lora.rnak' is not a numeric field of the train section"),
    ({"lora.rank": {"choice": [8, 0]}}, "the value 0 is not valid for train.lora.rank"),
])
def test_bad_search_space_is_a_clear_error_before_anything_starts(repo_root, tmp_path, space, message):
    cfg = yaml.safe_load((Path(repo_root) / "examples" / "quickstart.yaml").read_text())
    cfg["tune"] = {"search_space": space}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for cmd in (["config", "validate", str(path)], ["tune", str(path)]):
        out = subprocess.run([RAYFT, *cmd], cwd=repo_root, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stdout + out.stderr
        assert message in out.stderr
        assert "started a local Ray" not in out.stdout


@pytest.mark.parametrize("workers,space,message", [
    (3, {"train.learning_rate": {"choice": [1e-3]}}, "one trial needs 3 CPU"),
    # num_workers searched: the largest value is what must fit (a 3-worker trial would wait forever)
    (1, {"train.num_workers": {"grid": [1, 3]}}, "one trial needs 3 CPU (train.num_workers 3 x train.cpus_per_worker "
                                                 "1) (train.num_workers 3: the largest in tune.search_space)"),
])
def test_trial_that_cannot_fit_is_a_clear_error(repo_root, tiny_model_dir, tmp_path, workers, space, message):
    cfg = yaml.safe_load((Path(repo_root) / "examples" / "quickstart.yaml").read_text())
    cfg["model"]["name_or_path"] = str(tiny_model_dir)
    cfg["storage_path"] = str(tmp_path)
    cfg["train"].update({"num_workers": workers, "cpus_per_worker": 1.0})  # the CLI's local Ray: ray.num_cpus = 2
    cfg["tune"] = {"search_space": space}
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([RAYFT, "tune", str(path)], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr and "the cluster has 2" in out.stderr, out.stderr
