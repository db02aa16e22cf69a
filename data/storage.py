"""Where run data lives: a local folder or an object store URI (`s3://bucket/prefix`, `gs://...`), reached from every
node through one endpoint setting.

    storage:                                  # the `storage:` section (all optional)
      endpoint_url: http://minio.internal:9000  # an S3-compatible server; unset: AWS_ENDPOINT_URL, else AWS itself
      region: us-east-1
      path_style: true                        # bucket in the path (MinIO, SeaweedFS, Ceph); false: virtual hosts

The endpoint becomes `AWS_ENDPOINT_URL` of the process (boto3, and so MLflow's S3 artifact store, read it) and is
passed to pyarrow explicitly (pyarrow ignores that variable): Ray Train's `storage_filesystem`, Ray Data's reads of
`s3://` sources, run files, checkpoints and exports all go through `filesystem()` here. Credentials are never part of
a config, a log or a runtime_env: each node reads `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (or its instance
role) from its own environment.
"""
from __future__ import annotations

import os
import posixpath
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

ENDPOINT_ENV = "AWS_ENDPOINT_URL"
REGION_ENV = "AWS_REGION"
PATH_STYLE_ENV = "RAYFT_S3_PATH_STYLE"


class StorageConfig(BaseModel):
    """Object storage (S3 and S3-compatible servers) for sources, runs, checkpoints, MLflow artifacts and exports."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    endpoint_url: Optional[str] = Field(
        default=None, description="S3-compatible endpoint (http://host:port). Unset: `AWS_ENDPOINT_URL`, else AWS. "
        "Keys never go here: each node reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or its instance role.")
    region: Optional[str] = Field(default=None, description="Bucket region; unset: `AWS_REGION`, else us-east-1.")
    path_style: bool = Field(default=True, description="Bucket in the URL path (MinIO, SeaweedFS, Ceph); false: "
                             "virtual-hosted buckets (AWS's default).")


def apply_storage_settings(storage: Optional[StorageConfig]) -> None:
    """Make the config's endpoint the process's: boto3 (MLflow artifacts, downloads) and `filesystem()` read it from
    the environment, and Ray workers started from this process inherit it."""
    if storage is None:
        return
    if storage.endpoint_url:
        os.environ[ENDPOINT_ENV] = storage.endpoint_url
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", storage.endpoint_url)
    if storage.region:
        os.environ[REGION_ENV] = storage.region
    os.environ[PATH_STYLE_ENV] = "1" if storage.path_style else "0"


def is_uri(path: str) -> bool:
    """An object store URI (s3://, gs://, ...), not a local path (file:// counts as local)."""
    return "://" in str(path) and not str(path).startswith("file://")


def local_path(path: str) -> str:
    return os.path.abspath(str(path).removeprefix("file://"))


def join(base: str, *parts: str) -> str:
    """`os.path.join` for local folders, `/`-joined for URIs."""
    if is_uri(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def filesystem(path: str):
    """(pyarrow filesystem, path inside it) for a local path or URI; S3 goes to the configured endpoint."""
    import pyarrow.fs as pafs

    if not is_uri(path):
        return pafs.LocalFileSystem(), local_path(path)
    scheme, rest = path.split("://", 1)
    if scheme in ("s3", "s3a"):
        endpoint = os.environ.get(ENDPOINT_ENV) or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
        kwargs: dict = {"region": os.environ.get(REGION_ENV) or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
        if endpoint:
            proto, _, host = endpoint.partition("://") if "://" in endpoint else ("https", "", endpoint)
            kwargs.update(endpoint_override=host.rstrip("/"), scheme=proto)
            kwargs["force_virtual_addressing"] = os.environ.get(PATH_STYLE_ENV, "1") == "0"
        return pafs.S3FileSystem(**kwargs), rest.rstrip("/")
    fs, inner = pafs.FileSystem.from_uri(path)
    return fs, inner


def exists(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def is_file(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    return fs.get_file_info(p).type == pafs.FileType.File


def list_dir(path: str) -> list[str]:
    """Names directly under a folder or prefix (empty when it does not exist)."""
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False, allow_not_found=True))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def file_sizes(paths: list[str]) -> list[int]:
    """Sizes in bytes of files that share one filesystem (one listing request per file on object stores)."""
    if not paths:
        return []
    fs, _ = filesystem(paths[0])
    return [i.size for i in fs.get_file_info([filesystem(p)[1] for p in paths])]


def read_bytes(path: str, limit: Optional[int] = None) -> bytes:
    """A file's bytes; with `limit`, only its first `limit` bytes (a ranged read on object stores)."""
    fs, p = filesystem(path)
    with fs.open_input_file(p) as f:
        return f.read(limit) if limit is not None else f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file; locally through a temporary file and a rename, so a reader never sees half of it (an
    object store's PUT is atomic by itself)."""
    if not is_uri(path):
        target = local_path(path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = target + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
        return
    fs, p = filesystem(path)
    with fs.open_output_stream(p) as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def make_dirs(path: str) -> None:
    if not is_uri(path):
        os.makedirs(local_path(path), exist_ok=True)


def download_dir(path: str, local_dir: str) -> str:
    """A copy of a folder or prefix in `local_dir` (a local folder is copied too, so callers may modify it)."""
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(p, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


def upload_dir(local_dir: str, path: str) -> None:
    """Copy a local folder to a folder or prefix (replacing files of the same name)."""
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    if not is_uri(path):
        os.makedirs(p, exist_ok=True)
    pafs.copy_files(local_dir, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def copy_dir(src: str, dst: str) -> None:
    """Copy a folder or prefix to another (local or object storage, either way)."""
    import pyarrow.fs as pafs

    src_fs, s = filesystem(src)
    dst_fs, d = filesystem(dst)
    if not is_uri(dst):
        os.makedirs(d, exist_ok=True)
    pafs.copy_files(s, d, source_filesystem=src_fs, destination_filesystem=dst_fs)


def delete_dir(path: str) -> None:
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    if fs.get_file_info(p).type != pafs.FileType.NotFound:
        fs.delete_dir(p)


def train_storage(storage_path: str):
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: a local folder as is; a URI as the path inside
    the filesystem that reaches the configured endpoint."""
    if not is_uri(storage_path):
        return local_path(storage_path), None
    fs, p = filesystem(storage_path)
    return p, fs
