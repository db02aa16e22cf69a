"""Exported folders at rest: manifest, AES-256-GCM encryption, tamper/truncation/wrong-key refusal, pickle refusal."""
import base64
import json
import os

import pytest

from rayft.security.artifacts import (
    ENC_SUFFIX,
    MANIFEST,
    ArtifactError,
    check_weight_files,
    decrypt_folder,
    encrypt_folder,
    finish_export,
    key_id,
    opened_for_load,
    verify_manifest,
    write_manifest,
)
from rayft.security.config import ArtifactKeyError, SecurityConfig, load_key, parse_key_text

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def _export(tmp_path, big=False):
    d = tmp_path / "export"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    # > 1 MiB so the encryption spans several chunks
    (d / "model.safetensors").write_bytes(os.urandom((3 << 20) + 17 if big else 4096))
    (d / "sub" / "tokenizer.json").write_text('{"version": "1.0"}')
    (d / "empty.txt").write_bytes(b"")
    return d


def test_manifest_lists_every_file_and_verifies(tmp_path):
    d = _export(tmp_path)
    write_manifest(str(d))
    m = json.loads((d / MANIFEST).read_text())
    assert sorted(m["files"]) == ["config.json", "empty.txt", "model.safetensors", "sub/tokenizer.json"]
    assert m["files"]["config.json"]["size"] == len('{"model_type": "llama"}')
    assert m["encryption"] is None
    assert verify_manifest(str(d))["files"] == m["files"]


@pytest.mark.parametrize("damage,expected", [
    ("tamper", r"model\.safetensors: tampered or corrupted"),
    ("truncate", r"model\.safetensors: truncated \(4000 bytes, the manifest says 4096\)"),
    ("delete", r"model\.safetensors: missing"),
    ("extra", r"evil\.py: not in the manifest"),
])
def test_damaged_folder_is_refused_naming_the_file(tmp_path, damage, expected):
    d = _export(tmp_path)
    write_manifest(str(d))
    w = d / "model.safetensors"
    data = w.read_bytes()
    if damage == "tamper":
        w.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "truncate":
        w.write_bytes(data[:4000])
    elif damage == "delete":
        w.unlink()
    else:
        (d / "evil.py").write_text("import os")
    with pytest.raises(ArtifactError, match=expected):
        verify_manifest(str(d))
    with pytest.raises(ArtifactError, match=expected), opened_for_load(str(d)):
        pass


def test_encrypt_decrypt_round_trip_multi_chunk(tmp_path):
    d = _export(tmp_path, big=True)
    plain = {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    encrypt_folder(str(d), KEY)
    stored = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
    assert stored == sorted([f + ENC_SUFFIX for f in plain] + [MANIFEST])
    for f, data in plain.items():  # ciphertext reveals nothing of the plaintext
        enc = (d / (f + ENC_SUFFIX)).read_bytes()
        assert data[:64] not in enc or not data
    m = json.loads((d / MANIFEST).read_text())
    assert m["encryption"]["cipher"] == "AES-256-GCM" and m["encryption"]["key_id"] == key_id(KEY)
    out = tmp_path / "plain"
    out.mkdir()
    decrypt_folder(str(d), str(out), KEY)
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == plain


def test_wrong_key_is_told_apart(tmp_path):
    d = _export(tmp_path)
    encrypt_folder(str(d), KEY)
    with pytest.raises(ArtifactError, match=f"encrypted with key id {key_id(KEY)}, but the key given has id "
                       f"{key_id(OTHER_KEY)}"):
        decrypt_folder(str(d), str(tmp_path / "out"), OTHER_KEY)


def test_tampered_ciphertext_and_manifest_refused(tmp_path):
    d = _export(tmp_path, big=True)
    encrypt_folder(str(d), KEY)
    target = d / ("model.safetensors" + ENC_SUFFIX)
    data = bytearray(target.read_bytes())
    data[(1 << 20) + 50] ^= 0x01
    target.write_bytes(bytes(data))
    # The attacker also fixes up the manifest's digest: the manifest's MAC gives it away.
    m = json.loads((d / MANIFEST).read_text())
    import hashlib
    m["files"]["model.safetensors.enc"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="the manifest was modified after export"):
        decrypt_folder(str(d), str(tmp_path / "out"), KEY)


def test_ciphertext_swapped_between_files_fails_authentication(tmp_path):
    from rayft.security.artifacts import decrypt_file

    d = _export(tmp_path)
    encrypt_folder(str(d), KEY)
    (tmp_path / "out").mkdir()
    # config.json's ciphertext presented as tokenizer.json: the file name is bound as associated data
    with pytest.raises(ArtifactError, match=r"config\.json\.enc: decryption failed"):
        decrypt_file(str(d / "config.json.enc"), str(tmp_path / "out" / "x"), KEY, "sub/tokenizer.json")


def test_truncated_at_a_chunk_boundary_fails_authentication(tmp_path):
    from rayft.security.artifacts import _HEADER, _TAG, CHUNK, decrypt_file

    d = _export(tmp_path, big=True)
    encrypt_folder(str(d), KEY)
    target = d / ("model.safetensors" + ENC_SUFFIX)
    target.write_bytes(target.read_bytes()[: _HEADER + 2 * (CHUNK + _TAG)])  # two whole chunks kept
    (tmp_path / "out").mkdir()
    with pytest.raises(ArtifactError, match=r"model\.safetensors\.enc: decryption failed at chunk 1"):
        decrypt_file(str(target), str(tmp_path / "out" / "w"), KEY, "model.safetensors")


def test_opened_for_load_decrypts_privately_and_cleans_up(tmp_path, monkeypatch):
    d = _export(tmp_path)
    want = (d / "model.safetensors").read_bytes()
    monkeypatch.setenv("RAYFT_ARTIFACT_KEY", base64.b64encode(KEY).decode())
    assert finish_export(str(d), SecurityConfig(encrypt_artifacts=True)) is True
    with opened_for_load(str(d)) as plain:
        assert plain != str(d)
        assert os.stat(plain).st_mode & 0o077 == 0
        with open(os.path.join(plain, "model.safetensors"), "rb") as f:
            assert f.read() == want
    assert not os.path.exists(plain)
    monkeypatch.delenv("RAYFT_ARTIFACT_KEY")
    with pytest.raises(ArtifactKeyError, match="RAYFT_ARTIFACT_KEY is empty or missing"):
        with opened_for_load(str(d)):
            pass


def test_pickle_weights_refused_unless_allowed(tmp_path):
    d = _export(tmp_path)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04fake pickle")
    with pytest.raises(ArtifactError, match=r"pytorch_model\.bin: a pickle-based weight file.*allow_pickle_weights"):
        check_weight_files(str(d), allow_pickle=False)
    with pytest.raises(ArtifactError, match="pickle-based"):
        with opened_for_load(str(d)):
            pass
    with pytest.raises(ArtifactError, match="pickle-based"):
        finish_export(str(d), SecurityConfig())
    with opened_for_load(str(d), SecurityConfig(allow_pickle_weights=True)) as p:
        assert p == str(d)


def test_folder_without_manifest_loads_as_is(tmp_path):
    d = _export(tmp_path)  # a base model from the hub has no manifest
    with opened_for_load(str(d)) as p:
        assert p == str(d)
    with opened_for_load("Qwen/Qwen2.5-0.5B-Instruct") as p:  # a hub id passes through
        assert p == "Qwen/Qwen2.5-0.5B-Instruct"


# ----------------------------------------------------------------------------------------------- keys


def test_key_formats(tmp_path, monkeypatch):
    assert parse_key_text(KEY.hex()) == KEY
    assert parse_key_text(base64.b64encode(KEY).decode() + "\n") == KEY
    assert parse_key_text(base64.urlsafe_b64encode(KEY).decode()) == KEY
    assert parse_key_text("too-short") is None
    assert parse_key_text(base64.b64encode(b"x" * 31).decode()) is None
    raw = tmp_path / "raw.key"
    raw.write_bytes(KEY)
    assert load_key(SecurityConfig(key_file=str(raw))) == KEY
    bad = tmp_path / "bad.key"
    bad.write_text("hunter2")
    with pytest.raises(ArtifactKeyError, match=r"bad\.key'?: not a 256-bit key") as e:
        load_key(SecurityConfig(key_file=str(bad)))
    assert "hunter2" not in str(e.value)
    monkeypatch.setenv("MY_KEY", "not-a-key-value")
    with pytest.raises(ArtifactKeyError, match="MY_KEY does not hold a 256-bit key") as e:
        load_key(SecurityConfig(key_env="MY_KEY"))
    assert "not-a-key-value" not in str(e.value)


def test_key_never_in_config():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="never written in the config.*key_env.*key_file"):
        SecurityConfig.model_validate({"encrypt_artifacts": True, "key": base64.b64encode(KEY).decode()})
    with pytest.raises(ValidationError, match="NAME of an environment variable"):
        SecurityConfig(key_env=KEY.hex())
    with pytest.raises(ValidationError, match="NAME of an environment variable"):
        SecurityConfig(key_env=base64.b64encode(KEY).decode())
