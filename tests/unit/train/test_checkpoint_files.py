"""Checkpoint integrity: a checkpoint is used only if every rank's manifest matches its files."""
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from rayft.security.artifacts import file_sha256
from rayft.train.checkpoint import _write_json, check_checkpoint, choose_resume_checkpoint, rng_state, set_rng_state


def fake_checkpoint(root: Path, step: int, world: int = 2) -> str:
    d = root / f"checkpoint_step{step:08d}"
    for r in range(world):
        files = {}
        part = d / "engine" / f"rank{r}.bin"
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(os.urandom(64))
        files[str(part.relative_to(d))] = {"size": 64, "sha256": file_sha256(part)}
        if r == 0:
            _write_json(str(d / "state.json"), {"global_step": step, "world_size": world})
            files["state.json"] = {"size": (d / "state.json").stat().st_size, "sha256": file_sha256(d / "state.json")}
        _write_json(str(d / "manifest" / f"rank{r}.json"), {"rank": r, "world_size": world, "files": files})
    return str(d)


def test_intact_checkpoint_passes(tmp_path):
    assert check_checkpoint(fake_checkpoint(tmp_path, 10)) is None


def test_missing_rank_manifest_is_an_interrupted_save(tmp_path):
    d = fake_checkpoint(tmp_path, 10)
    os.remove(os.path.join(d, "manifest", "rank1.json"))
    assert "rank 1" in check_checkpoint(d)


def test_changed_file_is_detected(tmp_path):
    d = fake_checkpoint(tmp_path, 10)
    with open(os.path.join(d, "engine", "rank0.bin"), "r+b") as f:
        f.write(b"\0\0\0\0")
    assert "does not match" in check_checkpoint(d)


def test_corrupt_latest_falls_back_to_previous_with_warning(tmp_path):
    older = fake_checkpoint(tmp_path, 10)
    latest = fake_checkpoint(tmp_path, 20)
    os.truncate(os.path.join(latest, "engine", "rank1.bin"), 10)
    warnings = []
    assert choose_resume_checkpoint(latest, str(tmp_path), warnings.append) == older
    assert len(warnings) == 1 and "checkpoint_step00000020" in warnings[0] and "previous" in warnings[0]


def test_rng_state_round_trip():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state = json.loads(json.dumps(rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(2)
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
