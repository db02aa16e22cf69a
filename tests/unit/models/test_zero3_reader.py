"""The ZeRO-3 loader reads safetensors files tensor by tensor with plain reads; it must give exactly what
safetensors itself gives, for one file and for a sharded checkpoint."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rayft.models.zero3 import SafetensorsIndex, checkpoint_key, local_safetensors_files


def test_reads_every_dtype_and_shape_like_safetensors(tmp_path):
    tensors = {
        "a.weight": torch.randn(3, 5),
        "b.weight": torch.randn(7).to(torch.bfloat16),
        "c.bias": torch.randn(2, 2, 2).half(),
        "d.steps": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.empty": torch.empty(0, 4),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    files = local_safetensors_files(str(tmp_path))
    index = SafetensorsIndex(files)
    expected = load_file(files[0])
    for name, t in expected.items():
        got = index.read(name)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name


def test_sharded_checkpoint_is_found_through_its_index(tmp_path):
    save_file({"x.weight": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"y.weight": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "x.weight": "model-00001-of-00002.safetensors", "y.weight": "model-00002-of-00002.safetensors"}}))
    index = SafetensorsIndex(local_safetensors_files(str(tmp_path)))
    assert torch.equal(index.read("x.weight"), torch.ones(2)) and torch.equal(index.read("y.weight"), torch.zeros(3))


def test_folders_without_safetensors_and_hub_ids_have_no_files(tmp_path):
    assert local_safetensors_files(str(tmp_path)) is None
    assert local_safetensors_files("Qwen/Qwen2.5-0.5B-Instruct") is None


@pytest.mark.parametrize("name,stored,expected", [
    ("model.layers.0.q.weight", "model.layers.0.q.weight", "model.layers.0.q.weight"),
    ("model.layers.0.q.weight", "layers.0.q.weight", "layers.0.q.weight"),  # saved from the bare base model
    ("layers.0.q.weight", "model.layers.0.q.weight", "model.layers.0.q.weight"),
    ("lm_head.weight", "model.embed.weight", None),
])
def test_checkpoint_key_tolerates_the_base_model_prefix(tmp_path, name, stored, expected):
    save_file({stored: torch.ones(1)}, str(tmp_path / "model.safetensors"))
    index = SafetensorsIndex([str(tmp_path / "model.safetensors")])
    assert checkpoint_key(name, index, "model") == expected
