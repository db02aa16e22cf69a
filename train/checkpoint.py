"""What a checkpoint holds, how each rank writes its part, and how a resume finds a usable one.

One checkpoint folder (Ray Train merges every rank's part into it):

    engine/            DeepSpeed engine state (optimizer + scheduler + trainable weights) from every rank
    adapter/           the LoRA adapter in PEFT format (safetensors), gathered under ZeRO-3 (rank 0)
    state.json         global step, epoch, data position, best metric, early-stopping count (rank 0)
    rng/rank<R>.json   Python, NumPy and torch RNG states of rank R
    manifest/rank<R>.json  size and sha256 of every file rank R wrote, written last

A checkpoint is usable only when every rank's manifest is there and every file matches it, so a run
interrupted while saving (or a copy cut short) leaves the previous checkpoint as the one resumed from.

With `security.encrypt_artifacts`, each rank encrypts the files that hold weights or optimizer state (everything
under engine/ and adapter/) as `NAME.enc` (AES-256-GCM, bound to the file's path in the checkpoint) before its
manifest is written, so no plaintext copy reaches the storage. state.json, rng/ and manifest/ hold no weights and
stay readable: resume and the choice of the best checkpoint work without the key. Reading decrypts into a
private (0700) temporary folder (`opened_checkpoint`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

from rayft.data import storage
from rayft.security.artifacts import ENC_SUFFIX, decrypt_file, encrypt_file, file_sha256

STATE_FILE = "state.json"
ENGINE_DIR = "engine"
ADAPTER_DIR = "adapter"
ENGINE_TAG = "state"
CHECKPOINT_PREFIX = "checkpoint_step"


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def step_of(name: str) -> Optional[int]:
    m = re.fullmatch(CHECKPOINT_PREFIX + r"(\d+)", name)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    return {
        "python": _to_json(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(_from_json(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _to_json(x):
    return [_to_json(v) for v in x] if isinstance(x, (tuple, list)) else x


def _from_json(x):
    return tuple(_from_json(v) for v in x) if isinstance(x, list) else x


# ------------------------------------------------------------------------------------------ adapter


def adapter_state_dict(model, zero_stage: int) -> dict:
    """The adapter's tensors as plain full CPU tensors on every rank; under ZeRO-3 gathered from all ranks first."""
    from peft import get_peft_model_state_dict

    trainable = [p for p in model.parameters() if p.requires_grad]
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            return {k: v.detach().to("cpu").clone() for k, v in get_peft_model_state_dict(model).items()}
    return {k: v.detach().to("cpu").clone() for k, v in get_peft_model_state_dict(model).items()}


def save_adapter(model, state: dict, out_dir: str) -> None:
    """PEFT layout (adapter_config.json + adapter_model.safetensors) from an already gathered state dict."""
    from safetensors.torch import save_file

    empty = [k for k, v in state.items() if v.numel() == 0]
    if not state or empty:
        raise RuntimeError(f"refusing to save an empty adapter (empty tensors: {empty[:5] or 'no tensors at all'})")
    os.makedirs(out_dir, exist_ok=True)
    model.peft_config["default"].save_pretrained(out_dir)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------- writing


ENCRYPTED_PARTS = (ENGINE_DIR, ADAPTER_DIR)  # what holds weights or optimizer state


def encrypt_weights(local_dir: str, key: bytes) -> None:
    """Encrypt every file under engine/ and adapter/ of a checkpoint part in place (`NAME` -> `NAME.enc`)."""
    root = Path(local_dir)
    for part in ENCRYPTED_PARTS:
        for p in sorted((root / part).rglob("*")) if (root / part).is_dir() else []:
            if p.is_file() and not p.name.endswith(ENC_SUFFIX):
                encrypt_file(str(p), str(p) + ENC_SUFFIX, key, p.relative_to(root).as_posix())
                p.unlink()


def decrypt_weights(folder: str, key: bytes, prefix: str = "") -> None:
    """Decrypt every `NAME.enc` under `folder` in place; `prefix` is the folder's path inside its checkpoint
    (`adapter/` for a copied adapter), which each file was encrypted with."""
    root = Path(folder)
    for p in sorted(root.rglob("*" + ENC_SUFFIX)):
        plain = p.with_name(p.name[: -len(ENC_SUFFIX)])
        decrypt_file(str(p), str(plain), key, prefix + plain.relative_to(root).as_posix())
        p.unlink()


def is_encrypted(folder: str) -> bool:
    return any(Path(folder).rglob("*" + ENC_SUFFIX))


@contextlib.contextmanager
def opened_checkpoint(path: str, key_loader: Callable[[], bytes]) -> Iterator[str]:
    """A local checkpoint as it can be read: `path` itself, or for an encrypted one a private (0700) copy with its
    weights decrypted (the key from `key_loader`, read only then), removed when the block ends."""
    if not is_encrypted(path):
        yield path
        return
    key = key_loader()
    tmp = tempfile.mkdtemp(prefix="rayft-checkpoint-")
    try:
        shutil.copytree(path, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*" + ENC_SUFFIX))
        root = Path(path)
        for p in sorted(root.rglob("*" + ENC_SUFFIX)):
            rel = p.relative_to(root).as_posix()[: -len(ENC_SUFFIX)]
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            decrypt_file(str(p), os.path.join(tmp, rel), key, rel)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_rank_part(engine, local_dir: str, rank: int, world_size: int, zero_stage: int, state: dict,
                    model_cfg_for_adapter=None, key: Optional[bytes] = None) -> None:
    """Every rank calls this with its own local folder; Ray merges the folders when it persists them. With `key`
    (security.encrypt_artifacts) the weights and optimizer state are encrypted before the manifest lists them."""
    # Collective calls first, on every rank, in the same order.
    adapter = adapter_state_dict(engine.module, zero_stage)
    engine.save_checkpoint(os.path.join(local_dir, ENGINE_DIR), tag=ENGINE_TAG, exclude_frozen_parameters=True)
    written = []
    if rank == 0:
        save_adapter(engine.module, adapter, os.path.join(local_dir, ADAPTER_DIR))
        _write_json(os.path.join(local_dir, STATE_FILE), dict(state, world_size=world_size, zero_stage=zero_stage))
    _write_json(os.path.join(local_dir, "rng", f"rank{rank}.json"), rng_state())
    if key is not None:
        encrypt_weights(local_dir, key)
    root = Path(local_dir)
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.relative_to(root).parts[0] == "manifest":
            written.append(str(p.relative_to(root)))
    manifest = {"rank": rank, "world_size": world_size,
                "files": {f: {"size": (root / f).stat().st_size, "sha256": file_sha256(root / f)} for f in written}}
    _write_json(os.path.join(local_dir, "manifest", f"rank{rank}.json"), manifest)


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)




# ---------------------------------------------------------------------------------------- reading


def _file_info(path: str) -> Optional[int]:
    """The size of a file (local or in object storage), or None when it is missing."""
    import pyarrow.fs as pafs

    fs, p = storage.filesystem(path)
    info = fs.get_file_info(p)
    return info.size if info.type == pafs.FileType.File else None


def _sha256(path: str) -> str:
    if not storage.is_uri(path):
        return file_sha256(storage.local_path(path))
    h = hashlib.sha256()
    fs, p = storage.filesystem(path)
    with fs.open_input_stream(p) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_checkpoint(path: str) -> Optional[str]:
    """None if the checkpoint (a folder or an object-store prefix) is complete and intact; otherwise why it is not."""
    state_path = storage.join(path, STATE_FILE)
    if _file_info(state_path) is None:
        return f"{STATE_FILE} is missing"
    try:
        world = int(json.loads(storage.read_text(state_path))["world_size"])
    except (ValueError, KeyError) as e:
        return f"{STATE_FILE} is unreadable ({e})"
    for r in range(world):
        mpath = storage.join(path, "manifest", f"rank{r}.json")
        if _file_info(mpath) is None:
            return f"the manifest of rank {r} is missing (the save was interrupted)"
        try:
            files = json.loads(storage.read_text(mpath))["files"]
        except (ValueError, KeyError) as e:
            return f"the manifest of rank {r} is unreadable ({e})"
        for rel, meta in files.items():
            f = storage.join(path, *rel.split("/"))
            size = _file_info(f)
            if size is None:
                return f"{rel} is missing"
            if size != meta["size"] or _sha256(f) != meta["sha256"]:
                return f"{rel} does not match its manifest (size or checksum)"
    return None


def read_state(path: str) -> dict:
    return json.loads(storage.read_text(storage.join(path, STATE_FILE)))


def checkpoints_of(run_dir: Optional[str]) -> list[tuple[int, str]]:
    """(step, path) of the checkpoint folders of a run folder or bucket prefix, newest first."""
    if not run_dir:
        return []
    names = storage.list_dir(run_dir)
    return sorted(((step_of(d), storage.join(run_dir, d)) for d in names if step_of(d) is not None), reverse=True)


def choose_resume_checkpoint(latest: Optional[str], run_dir: Optional[str], warn: Callable[[str], None],
                             scratch: Optional[str] = None) -> Optional[str]:
    """The newest intact checkpoint among Ray's latest and the run folder's (a local folder or a bucket prefix); a
    damaged one is skipped with a warning. A checkpoint in object storage is downloaded into `scratch` first and
    returned as that local copy (its files are checked there)."""
    candidates = [p for _, p in checkpoints_of(run_dir)]
    if latest and not any(not storage.is_uri(p) and os.path.realpath(p) == os.path.realpath(latest)
                          for p in candidates):
        candidates.insert(0, latest)  # Ray's copy: the only one we can see when the run folder is elsewhere
    for path in candidates:
        local = path
        if storage.is_uri(path):
            if step_of(os.path.basename(path.rstrip("/"))) is not None and latest and \
                    step_of(os.path.basename(path.rstrip("/"))) == _step_in(latest):
                continue  # the same checkpoint as Ray's latest, already tried from its local copy
            local = storage.download_dir(path, os.path.join(scratch or "/tmp", os.path.basename(path.rstrip("/"))))
        problem = check_checkpoint(local)
        if problem is None:
            return local
        warn(f"checkpoint {_display_name(path)} is not usable ({problem}); trying the previous one")
    return None


def _display_name(path: str) -> str:
    """A checkpoint as the user knows it: Ray's temporary copy of a remote one is named by its step."""
    if step_of(os.path.basename(path.rstrip("/"))) is not None:
        return path
    step = _step_in(path)
    return f"{checkpoint_dir_name(step)} (Ray's copy in {path})" if step is not None else path


def _step_in(path: str) -> Optional[int]:
    """The step of a checkpoint folder: from its name, else from its state file."""
    step = step_of(os.path.basename(path.rstrip("/")))
    if step is not None:
        return step
    try:
        return int(read_state(path).get("global_step"))
    except (OSError, ValueError, TypeError):
        return None


def best_and_latest(run_dir: str) -> dict:
    """Intact checkpoints of a run folder: {'latest': path, 'best': path (lowest eval loss) or None}."""
    found = [(step, p, read_state(p).get("eval_loss")) for step, p in checkpoints_of(run_dir)
             if check_checkpoint(p) is None]
    if not found:
        return {"latest": None, "best": None}
    found.sort()
    scored = [f for f in found if f[2] is not None]
    return {"latest": found[-1][1], "best": min(scored, key=lambda f: f[2])[1] if scored else None}
