"""Storage faults during real training runs (local Ray, DeepSpeed on gloo, the tiny model).

The kills of a worker and of the driver are in test_train_distributed.py and e2e/test_train_cli.py; this
module covers what goes wrong with the checkpoint storage, in one sequence of two short runs:

1. Mid-run, after checkpoint 6 is intact, the destination of checkpoint 9 becomes unwritable: a plain file
   takes the place of its folder (a real write failure even as root, where chmod does not stop writes).
   The run must fail with an error that names the checkpoint path and says what to do, and checkpoints
   3 and 6 stay intact.
2. The latest checkpoint (6) is then damaged (a file truncated). `--resume` must skip it with a warning and
   continue from checkpoint 3, the previous intact one, and finish the planned steps: nothing trained before
   the last intact checkpoint is lost.
The data is prepared once and both runs go through `fit`, the driver `rayft train` and `rayft tune` share.
3. Damaging the latest checkpoint of the finished run: export picks the previous intact one.
"""
import os
import threading
import time

import pytest

pytestmark = pytest.mark.slow

STEPS = 9
EVERY = 3
A, B = EVERY, 2 * EVERY  # checkpoints before the fault


def _config(repo_root, model_dir, storage, *extra):
    from rayft.cluster.config import load_config

    return load_config(repo_root / "examples" / "quickstart.yaml", [
        "name=faults", f"model.name_or_path={model_dir}", f"storage_path={storage}",
        "train.num_workers=1", f"train.max_steps={STEPS}", f"train.save_every_n_steps={EVERY}",
        f"train.eval_every_n_steps={STEPS}", "train.max_failures=0", "train.learning_rate=1e-2",
        "train.keep_best_checkpoints=3", "tracking.enabled=false", "data.max_seq_length=256", *extra])


def truncate_a_file(checkpoint: str) -> str:
    """Cut the adapter weights of a checkpoint in half, as a crash or a bad copy would."""
    path = os.path.join(checkpoint, "adapter", "adapter_model.safetensors")
    os.truncate(path, os.path.getsize(path) // 2)
    return path


@pytest.fixture(scope="module")
def faulty_storage(ray_local, repo_root, tiny_model_dir, tmp_path_factory):
    from rayft.train.checkpoint import check_checkpoint, checkpoint_dir_name
    from rayft.train.trainer import fit, prepare_training_data

    storage = str(tmp_path_factory.mktemp("fault-runs"))
    cfg = _config(repo_root, tiny_model_dir, storage)
    run_dir = os.path.join(storage, cfg.name)
    ckpt = {s: os.path.join(run_dir, checkpoint_dir_name(s)) for s in (A, B, STEPS)}
    data = prepare_training_data(cfg, log=lambda _: None)
    first = {"logs": [], "error": None}

    def run_first():
        try:
            fit(cfg, data, log=first["logs"].append)
        except BaseException as e:  # the failure is what the tests look at
            first["error"] = e

    thread = threading.Thread(target=run_first, daemon=True)
    thread.start()
    blocked = False
    deadline = time.time() + 600
    while time.time() < deadline and thread.is_alive():
        if os.path.isdir(ckpt[B]) and check_checkpoint(ckpt[B]) is None:
            assert not os.path.exists(ckpt[STEPS]), "the run reached the last step before the storage could be broken"
            with open(ckpt[STEPS], "w") as f:  # the folder Ray must create for the last checkpoint cannot be made
                f.write("not a folder")
            blocked = True
            break
        time.sleep(0.05)
    thread.join(timeout=600)
    assert blocked and not thread.is_alive(), first["logs"]
    intact_after_failure = {s: check_checkpoint(ckpt[s]) for s in (A, B)}

    os.remove(ckpt[STEPS])  # the storage is writable again
    damaged = truncate_a_file(ckpt[B])
    second_logs: list = []
    outcome = fit(cfg, data, resume=True, log=second_logs.append)
    return {"cfg": cfg, "run_dir": run_dir, "ckpt": ckpt, "first": first, "intact": intact_after_failure,
            "damaged": damaged, "second_logs": second_logs, "outcome": outcome}


def test_unwritable_checkpoint_storage_fails_with_a_clear_error(faulty_storage):
    from rayft.train.trainer import TrainingError

    err = faulty_storage["first"]["error"]
    assert isinstance(err, TrainingError), repr(err)
    msg = str(err)
    assert msg.startswith(f"training failed: worker 0: cannot write checkpoint step {STEPS} to "), msg
    assert "Traceback" not in msg, msg  # the loop's message, not Ray's wrapper with the worker's traceback
    assert faulty_storage["ckpt"][STEPS] in msg, msg  # the path that could not be written
    assert f"checkpoint_step{B:08d}" in msg and "--resume" in msg, msg  # the intact one, and what to do


def test_previous_checkpoints_stay_intact_after_the_failed_save(faulty_storage):
    assert faulty_storage["intact"] == {A: None, B: None}


def test_damaged_latest_checkpoint_is_skipped_and_training_continues_from_the_previous_one(faulty_storage):
    logs = [str(m) for m in faulty_storage["second_logs"]]
    m = faulty_storage["outcome"].metrics
    assert m["global_step"] == STEPS and m["total_steps"] == STEPS, m
    assert m["start_step"] == A, m  # the latest checkpoint is damaged: back to the one before, not to 0
    assert any(f"checkpoint_step{B:08d} is not usable" in line and "does not match" in line for line in logs), logs
    assert any(f"resumed from checkpoint_step{A:08d} at step {A}" in line for line in logs), logs


def test_export_skips_a_damaged_latest_checkpoint(faulty_storage):
    from rayft.train.checkpoint import best_and_latest, check_checkpoint, step_of
    from rayft.train.export import find_adapter

    run_dir = faulty_storage["run_dir"]
    latest = best_and_latest(run_dir)["latest"]
    assert step_of(os.path.basename(latest)) == STEPS
    truncate_a_file(latest)
    assert check_checkpoint(latest) is not None
    chosen = os.path.dirname(find_adapter(run_dir, "latest"))
    assert chosen != latest and check_checkpoint(chosen) is None
    assert step_of(os.path.basename(chosen)) < STEPS
