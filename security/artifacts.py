"""Exported folders at rest: a manifest of SHA-256 digests, optional AES-256-GCM encryption, safetensors only.

    DIR/rayft-manifest.json   {"format": 1, "files": {relpath: {"sha256", "size"}}, "encryption": null | {...}, "mac"}

`write_manifest` is the last step of every export; `verify_manifest` refuses a folder whose files were changed,
cut short, removed or added since, naming the file. With encryption each file is stored as `<name>.enc`:

    header   b"RAYFTAE1" | chunk size (uint32, big endian) | 7-byte random nonce prefix
    chunks   AES-256-GCM of each 1 MiB of plaintext; nonce = prefix | chunk counter (uint32) | last-chunk flag

The associated data of every chunk is the header plus the file's path inside the folder, so a chunk cannot be
moved to another position or file, a file cannot be renamed or swapped, and a file cut at a chunk boundary fails
(its new last chunk was not encrypted as the last one). Chunking keeps memory flat for multi-GB weights. An
encrypted manifest carries the key's id (an HMAC of a fixed label, not the key) and an HMAC of its own content,
so a wrong key is told apart from a tampered file, and the manifest itself cannot be edited without the key.

Loaders call `opened_for_load(path, security)`: it checks for pickle files, verifies the manifest when there is
one, and decrypts into a private (0700) temporary folder that is deleted when the block ends. A local folder
without a manifest (a base model) loads as unverified, with a warning, unless `security.require_manifest` refuses it.

Deleting the manifest must not turn the check off, so trust is anchored where the artifact store cannot change it:
a registered version (and the run that logged it) records the SHA-256 of its manifest in the registry
(registry/versions.py), and loading by `models:/` or `runs:/` checks the downloaded manifest against it with
`verify_anchor` before the files are checked against the manifest.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import shutil
import struct
import tempfile
from typing import Iterator, Optional

from .config import SecurityConfig, load_key

MANIFEST = "rayft-manifest.json"
ENC_SUFFIX = ".enc"
MAGIC = b"RAYFTAE1"
CHUNK = 1 << 20
_PREFIX = 7
_HEADER = len(MAGIC) + 4 + _PREFIX
_TAG = 16
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

def file_sha256(path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (checkpoint and export manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


log = logging.getLogger("rayft.security")


class ArtifactError(RuntimeError):
    """An exported folder that must not be loaded: tampered, truncated, incomplete, wrong key, or pickle weights."""


def manifest_sha256(folder: str) -> Optional[str]:
    """The SHA-256 of the folder's manifest file (what the registry records), or None without one."""
    path = os.path.join(folder, MANIFEST)
    return file_sha256(path) if os.path.isfile(path) else None


def verify_anchor(folder: str, expected_sha256: str, source: str) -> None:
    """Refuse `folder` (the local copy of `source`) unless its manifest is the one recorded at registration."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise ArtifactError(f"{path}: missing; {source} was registered with a manifest (SHA-256 "
                            f"{expected_sha256[:16]}...) and the stored copy has none, so its files cannot be checked. "
                            f"Refusing to load it: the artifact store was changed after registration; restore the "
                            f"artifact or register a new export")
    got = file_sha256(path)
    if not hmac.compare_digest(got, expected_sha256):
        raise ArtifactError(f"{path}: not the manifest {source} was registered with (SHA-256 {got[:16]}..., the "
                            f"registry recorded {expected_sha256[:16]}...). Refusing to load it: the artifact store "
                            f"was changed after registration; restore the artifact or register a new export")


# ------------------------------------------------------------------------------------------ manifest


def _files(folder: str) -> list[str]:
    out = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for n in sorted(names):
            rel = os.path.relpath(os.path.join(root, n), folder).replace(os.sep, "/")
            if rel != MANIFEST:
                out.append(rel)
    return out


def key_id(key: bytes) -> str:
    """A public name of a key: equal keys give equal ids, and the id reveals nothing of the key."""
    return hmac.new(key, b"rayft-key-id-v1", hashlib.sha256).hexdigest()[:16]


def _mac(key: bytes, manifest: dict) -> str:
    body = json.dumps({k: v for k, v in manifest.items() if k != "mac"}, sort_keys=True, separators=(",", ":"))
    mac_key = hmac.new(key, b"rayft-manifest-mac-v1", hashlib.sha256).digest()
    return hmac.new(mac_key, body.encode(), hashlib.sha256).hexdigest()


def write_manifest(folder: str, key: Optional[bytes] = None, encrypted: bool = False) -> str:
    """Hash every file of `folder` into DIR/rayft-manifest.json (with `key`: the encryption record and a MAC)."""
    manifest: dict = {"format": 1, "algorithm": "sha256", "files": {}, "encryption": None}
    for rel in _files(folder):
        p = os.path.join(folder, rel)
        manifest["files"][rel] = {"sha256": file_sha256(p), "size": os.path.getsize(p)}
    if encrypted:
        if key is None:
            raise ValueError("write_manifest: an encrypted manifest needs the key for its MAC")
        manifest["encryption"] = {"cipher": "AES-256-GCM", "chunk_bytes": CHUNK, "key_id": key_id(key),
                                  "suffix": ENC_SUFFIX}
        manifest["mac"] = _mac(key, manifest)
    path = os.path.join(folder, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


def read_manifest(folder: str) -> Optional[dict]:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: the manifest is not valid JSON ({e}); the export is damaged, export it again") \
            from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path}: not a rayft manifest (no `files` mapping); the export is damaged, export it again")
    return manifest


def verify_manifest(folder: str, key: Optional[bytes] = None) -> dict:
    """Check every file of `folder` against its manifest; raises ArtifactError naming the first bad file.

    With `key` and an encrypted manifest, the key id and the manifest's MAC are checked first."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise ArtifactError(f"{folder}: no {MANIFEST}; rayft exports always write one, so this folder is not a "
                            f"complete rayft export (export it again)")
    enc = manifest.get("encryption")
    if enc and key is not None:
        if enc.get("key_id") != key_id(key):
            raise ArtifactError(f"{folder}: encrypted with key id {enc.get('key_id')}, but the key given has id "
                                f"{key_id(key)}; set the key this artifact was exported with")
        if not hmac.compare_digest(str(manifest.get("mac", "")), _mac(key, manifest)):
            raise ArtifactError(f"{os.path.join(folder, MANIFEST)}: the manifest was modified after export (its MAC "
                                f"does not match); do not load this folder, export it again")
    listed = manifest["files"]
    for rel, want in sorted(listed.items()):
        p = os.path.join(folder, rel)
        if not os.path.isfile(p):
            raise ArtifactError(f"{p}: missing; the manifest of {folder} lists it. The export is incomplete: copy "
                                f"the whole folder again or re-export")
        size = os.path.getsize(p)
        if size != want.get("size"):
            what = "truncated" if size < want.get("size", 0) else "larger than exported"
            raise ArtifactError(f"{p}: {what} ({size} bytes, the manifest says {want.get('size')}); refusing to "
                                f"load it. Copy the file again or re-export")
        if not hmac.compare_digest(file_sha256(p), str(want.get("sha256"))):
            raise ArtifactError(f"{p}: tampered or corrupted (its SHA-256 does not match the manifest); refusing to "
                                f"load it. Copy the file again or re-export")
    extra = sorted(set(_files(folder)) - set(listed))
    if extra:
        raise ArtifactError(f"{os.path.join(folder, extra[0])}: not in the manifest (added after export); refusing "
                            f"to load {folder}. Remove the file or re-export" +
                            (f" ({len(extra)} such files)" if len(extra) > 1 else ""))
    return manifest


# ---------------------------------------------------------------------------------------- encryption


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    return prefix + struct.pack(">I", counter) + (b"\x01" if last else b"\x00")


def encrypt_file(src: str, dst: str, key: bytes, name: str) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aes = AESGCM(key)
    prefix = os.urandom(_PREFIX)
    header = MAGIC + struct.pack(">I", CHUNK) + prefix
    aad = header + name.encode("utf-8")
    size = os.path.getsize(src)
    n_chunks = max(1, -(-size // CHUNK))
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(header)
        for i in range(n_chunks):
            fout.write(aes.encrypt(_nonce(prefix, i, i == n_chunks - 1), fin.read(CHUNK), aad))


def decrypt_file(src: str, dst: str, key: bytes, name: str) -> None:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aes = AESGCM(key)
    size = os.path.getsize(src)
    with open(src, "rb") as fin:
        header = fin.read(_HEADER)
        if len(header) != _HEADER or not header.startswith(MAGIC):
            raise ArtifactError(f"{src}: not a rayft-encrypted file (bad header); the file was replaced or damaged")
        chunk = struct.unpack(">I", header[len(MAGIC):len(MAGIC) + 4])[0]
        prefix = header[len(MAGIC) + 4:]
        aad = header + name.encode("utf-8")
        body = size - _HEADER
        n_chunks = max(1, -(-body // (chunk + _TAG)))
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fout:
            for i in range(n_chunks):
                block = fin.read(chunk + _TAG)
                try:
                    fout.write(aes.decrypt(_nonce(prefix, i, i == n_chunks - 1), block, aad))
                except InvalidTag:
                    raise ArtifactError(
                        f"{src}: decryption failed at chunk {i} (authentication tag mismatch): the file was "
                        f"altered, truncated or moved from another file, or the key is not the one it was encrypted "
                        f"with; refusing to load it") from None


def encrypt_folder(folder: str, key: bytes) -> str:
    """Encrypt every file of `folder` in place (`name` -> `name.enc`) and write the encrypted manifest."""
    existing = read_manifest(folder)
    if existing and existing.get("encryption"):
        raise ArtifactError(f"{folder} is already encrypted")
    for rel in _files(folder):
        p = os.path.join(folder, rel)
        encrypt_file(p, p + ENC_SUFFIX, key, rel)
        os.remove(p)
    return write_manifest(folder, key, encrypted=True)


def decrypt_folder(src: str, dst: str, key: bytes) -> str:
    """Verify the encrypted folder `src` (manifest, key id, MAC) and write its plaintext files into `dst`."""
    return _decrypt_verified(src, dst, key, verify_manifest(src, key))


def _decrypt_verified(src: str, dst: str, key: bytes, manifest: dict) -> str:
    if not manifest.get("encryption"):
        raise ArtifactError(f"{src} is not encrypted")
    for rel in manifest["files"]:
        if not rel.endswith(ENC_SUFFIX):
            raise ArtifactError(f"{os.path.join(src, rel)}: an encrypted export holds only {ENC_SUFFIX} files")
        plain = rel[: -len(ENC_SUFFIX)]
        out = os.path.join(dst, plain)
        os.makedirs(os.path.dirname(out), mode=0o700, exist_ok=True)
        decrypt_file(os.path.join(src, rel), out, key, plain)
    return dst


# ------------------------------------------------------------------------------------------- loading


def check_weight_files(folder: str, allow_pickle: bool) -> None:
    """Refuse pickle-based weight files (unpickling runs code) unless the config allows them."""
    if allow_pickle:
        return
    for rel in _files(folder):
        base = rel.removesuffix(ENC_SUFFIX)
        if base.lower().endswith(PICKLE_SUFFIXES):
            raise ArtifactError(
                f"{os.path.join(folder, rel)}: a pickle-based weight file; rayft loads safetensors only (unpickling "
                f"can run arbitrary code). Convert it to safetensors (save_pretrained(..., safe_serialization=True)), "
                f"remove it, or set security.allow_pickle_weights: true if you trust its origin")


def finish_export(folder: str, security: Optional[SecurityConfig]) -> bool:
    """The last step of an export: the manifest, and encryption when the config asks. Returns whether encrypted."""
    security = security or SecurityConfig()
    check_weight_files(folder, security.allow_pickle_weights)
    if security.encrypt_artifacts:
        encrypt_folder(folder, load_key(security))
        return True
    write_manifest(folder)
    return False


def check_for_load(path: str, security: Optional[SecurityConfig] = None) -> Optional[dict]:
    """Every refusal of `opened_for_load`, without decrypting anything (a server checks its sources with it before
    it deploys). Returns the verified manifest; None for a folder without one (an unverified base model, with a
    warning) or for what is not a local folder (a hub id)."""
    security = security or SecurityConfig()
    if not os.path.isdir(path):
        return None
    check_weight_files(path, security.allow_pickle_weights)
    manifest = read_manifest(path)
    if manifest is None:
        if security.require_manifest:
            raise ArtifactError(f"{path}: no {MANIFEST}, and security.require_manifest is true; only rayft exports "
                                f"(which carry a manifest) are loaded. Load an export made by rayft, or set "
                                f"security.require_manifest: false to load this folder as an unverified base model")
        log.warning("%s: no %s; loaded as an unverified base model (nothing checks its files). Set "
                    "security.require_manifest: true to refuse such folders", path, MANIFEST)
        return None
    return verify_manifest(path, load_key(security) if manifest.get("encryption") else None)


def prepared_for_load(path: str, private_dir: str, security: Optional[SecurityConfig] = None) -> str:
    """`opened_for_load` for a reader that needs the files for longer than a `with` block (a vLLM replica reads its
    model at start and its adapters on demand): `path` itself when it is checked and not encrypted, else its
    decrypted copy under `private_dir` (a 0700 folder the caller owns and removes when it stops)."""
    security = security or SecurityConfig()
    manifest = check_for_load(path, security)
    if manifest is None or not manifest.get("encryption"):
        return path
    os.makedirs(private_dir, mode=0o700, exist_ok=True)
    dst = tempfile.mkdtemp(prefix="decrypted-", dir=private_dir)  # 0700 as well
    return _decrypt_verified(path, dst, load_key(security), manifest)


@contextlib.contextmanager
def opened_for_load(path: str, security: Optional[SecurityConfig] = None) -> Iterator[str]:
    """A folder rayft may load from: `path` itself (checked) or a private decrypted copy, removed afterwards.

    Not a local folder (a hub id): yielded unchanged; `from_pretrained(..., use_safetensors=True)` guards it."""
    security = security or SecurityConfig()
    manifest = check_for_load(path, security)
    if manifest is None or not manifest.get("encryption"):
        yield path
        return
    key = load_key(security)
    tmp = tempfile.mkdtemp(prefix="rayft-decrypted-")  # mode 0700: only this user can read the plaintext
    try:
        _decrypt_verified(path, tmp, key, manifest)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
