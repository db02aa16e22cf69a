"""Model loading: dtype by device, QLoRA refused on CPU, LoRA wrapping of the tiny model."""
import pytest

from rayft.models.config import ModelConfig
from rayft.models.load import choose_dtype
from rayft.train.config import TrainConfig
from rayft.train.model import QuantizationUnavailable, build_peft_model, check_quantization


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_fp32_on_cpu():
    assert choose_dtype(ModelConfig(name_or_path="m"), on_gpu=False) == "float32"
    assert choose_dtype(ModelConfig(name_or_path="m", dtype="bfloat16"), on_gpu=False) == "bfloat16"


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_refused_on_cpu_with_why_and_what_instead(bits):
    with pytest.raises(QuantizationUnavailable) as e:
        check_quantization(ModelConfig(name_or_path="m", quantization=bits), TrainConfig())
    msg = str(e.value)
    assert bits in msg and "CUDA GPU" in msg and "train.use_gpu is false" in msg
    assert "model.quantization: none" in msg and "offload_params" in msg


def test_qlora_refused_when_gpu_asked_but_absent():
    if has_cuda():
        pytest.skip("a GPU is present; this checks the no-GPU refusal")
    with pytest.raises(QuantizationUnavailable, match="no CUDA GPU is visible"):
        check_quantization(ModelConfig(name_or_path="m", quantization="4bit"), TrainConfig(use_gpu=True))


@pytest.mark.gpu("bitsandbytes")  # skipped without CUDA or bitsandbytes (tests/conftest.py)
def test_qlora_loads_4bit_on_gpu(tiny_model_dir):
    model = build_peft_model(ModelConfig(name_or_path=tiny_model_dir, quantization="4bit"),
                             TrainConfig(use_gpu=True), "bfloat16", device_map={"": 0})
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_lora_on_tiny_model_reports_trainable(tiny_model_dir):
    lines = []
    model = build_peft_model(ModelConfig(name_or_path=tiny_model_dir), TrainConfig(), "float32", log=lines.append)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert "trainable of" in lines[0] and "q_proj" in lines[0]
