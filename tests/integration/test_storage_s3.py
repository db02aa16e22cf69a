"""Object storage for real: a SeaweedFS S3 server on loopback (tests/s3_server.py), reached through the one endpoint
setting (AWS_ENDPOINT_URL here, `storage.endpoint_url` in a config) with the keys in the standard variables."""
from __future__ import annotations

from pathlib import Path

import pytest

from rayft.data import storage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def s3_env(s3_server, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    return s3_server


def test_storage_round_trip(s3_env, tmp_path):
    bucket = s3_env.create_bucket("roundtrip")
    storage.write_text(bucket + "/runs/x/rayft_run.json", '{"a": 1}')
    assert storage.is_file(bucket + "/runs/x/rayft_run.json") and storage.is_dir(bucket + "/runs/x")
    assert storage.list_dir(bucket + "/runs") == ["x"] and storage.list_dir(bucket + "/nothing") == []
    assert storage.read_bytes(bucket + "/runs/x/rayft_run.json", limit=4) == b'{"a"'  # a ranged read
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.bin").write_bytes(b"123")
    storage.upload_dir(str(tmp_path / "d"), bucket + "/runs/x/adapter")
    out = storage.download_dir(bucket + "/runs/x/adapter", str(tmp_path / "e"))
    assert Path(out, "f.bin").read_bytes() == b"123"
    storage.delete_dir(bucket + "/runs/x")
    assert not storage.exists(bucket + "/runs/x/rayft_run.json")


def test_sources_on_s3_give_the_same_data_as_local(s3_env, ray_local, tiny_model_dir):
    """The sample sources uploaded to a bucket: same rows read, kept and rejected as from local disk."""
    from rayft.cluster.config import config_from_dict
    from rayft.data.pipeline import TokenizerSpec, prepare

    bucket = s3_env.create_bucket("sources")
    for name in ("support_qa.json", "chats.csv", "kb.jsonl"):
        s3_env.upload(REPO / "examples" / "data" / name, f"{bucket}/data/{name}")

    def run(prefix: str):
        cfg = config_from_dict({"name": "s3data", "model": {"name_or_path": tiny_model_dir}, "data": {
            "sources": [{"name": "support_qa", "path": f"{prefix}/support_qa.json", "schema": "qa"},
                        {"name": "chats", "path": f"{prefix}/chats.csv"},
                        {"name": "kb", "path": f"{prefix}/kb.jsonl"}],
            "max_seq_length": 256, "eval_fraction": 0.1}})
        out = prepare(cfg.data, TokenizerSpec(tiny_model_dir), log=lambda *_: None)
        rows = sorted(tuple(r["input_ids"]) for r in out.train.take_all())
        return {s["name"]: (s["read"], s["kept"], s["rejected"]) for s in out.report["sources"]}, rows

    remote, fp_remote = run(f"{bucket}/data")
    local, fp_local = run(str(REPO / "examples" / "data"))
    assert remote == local and remote["chats"][2] > 0, (remote, local)
    assert fp_remote == fp_local  # the same training rows, wherever they were read from
