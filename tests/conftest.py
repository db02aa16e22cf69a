"""Session fixtures shared by every test package (unit, integration, e2e).

- `tiny_model_dir`: a tiny Llama + tokenizer built once per session (about 10 s), loaded through the
  real `from_pretrained` path like any hub model.
- `tiny_tokenizer`: that tokenizer, loaded once.
- `ray_local`: a local Ray (2 CPUs) started once per session by `cluster.ray_conn.connect`, shut
  down at the end. Tests that need Ray take this fixture; unit tests never do.
- `repo_root`, `sample_data_dir`: where the project and its bundled sample data live.
- `s3_server`: a real S3-compatible server (SeaweedFS) on loopback for the session (tests/s3_server.py).
"""
import os

# DeepSpeed probes for an accelerator at import time; these machines have none. A GPU run can override.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# The test S3 server's static keys are in this process's environment from the start, as a cluster node has its own
# keys (or instance role): every Ray worker the tests start inherits them. The endpoint is set where it is needed.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "rayft-test-key")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "rayft-test-secret")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

try:  # keep property tests free of wall-clock flakiness on a loaded 2-core machine
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "rayft", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
    )
    settings.load_profile("rayft")
except ImportError:  # hypothesis is a test extra; unit tests that do not use it still run
    pass

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA_DIR = REPO_ROOT / "examples" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def sample_data_dir() -> Path:
    return SAMPLE_DATA_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """Folder with config.json, model.safetensors and tokenizer files of a tiny Llama."""
    from rayft.train.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-model")
    return build_tiny_model(str(out))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for the whole session (cluster.ray_conn.connect uses address="local")."""
    import ray

    from rayft.cluster.ray_conn import connect

    started_here = not ray.is_initialized()
    connect(num_cpus=2)
    yield ray
    if started_here:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS's S3 API on a free loopback port, static keys; stopped by its process id at the end."""
    from tests.s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.stop()


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests need a CUDA GPU; `@pytest.mark.gpu("bitsandbytes", ...)` also those packages (the
    `gpu` extra). Where either is missing they are skipped with the reason, never run into an import error."""
    import importlib.util

    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    for item in gpu_items:
        missing = [m for m in item.get_closest_marker("gpu").args if importlib.util.find_spec(m) is None]
        if not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is visible to this process"))
        elif missing:
            item.add_marker(pytest.mark.skip(
                reason=f"needs {', '.join(missing)} (pip install 'rayft[gpu]'); not installed here"))
