"""The DeepSpeed config: built from ours in one place, overridable by a user JSON."""
import json

import pytest

from rayft.train.config import TrainConfig
from rayft.train.ds_config import DeepSpeedConfigError, build_deepspeed_config
from rayft.train.schedule import lr_lambda, warmup_steps_for


def test_built_from_our_fields():
    t = TrainConfig(num_workers=2, micro_batch_size=3, gradient_accumulation_steps=2, learning_rate=1e-3,
                    max_grad_norm=0.5, deepspeed={"zero_stage": 3, "offload_optimizer": True, "offload_params": True})
    ds = build_deepspeed_config(t, "bfloat16")
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 12 and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["lr"] == 1e-3
    assert ds["optimizer"]["params"]["torch_adam"]  # no JIT build of DeepSpeed's Adam ops, with or without offload
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


def test_user_json_overrides_deeply(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "optimizer": {"params": {"eps": 1e-6}},
                             "train_batch_size": "auto"}))
    ds = build_deepspeed_config(TrainConfig(deepspeed={"config_file": str(f)}), "float32")
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert ds["optimizer"]["params"]["eps"] == 1e-6 and ds["optimizer"]["params"]["lr"] == 2e-4
    assert ds["train_batch_size"] == 4


def test_user_json_may_not_set_batch_sizes(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16}))
    with pytest.raises(DeepSpeedConfigError, match="train_micro_batch_size_per_gpu.*train.micro_batch_size"):
        build_deepspeed_config(TrainConfig(deepspeed={"config_file": str(f)}), "float32")


def test_unreadable_user_json(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text("{not json")
    with pytest.raises(DeepSpeedConfigError, match="not valid JSON"):
        build_deepspeed_config(TrainConfig(deepspeed={"config_file": str(f)}), "float32")
    with pytest.raises(DeepSpeedConfigError, match="cannot be read"):
        build_deepspeed_config(TrainConfig(deepspeed={"config_file": str(tmp_path / "nope.json")}), "float32")


def test_warmup_then_cosine_and_linear_decay():
    f = lr_lambda("cosine", 2, 10)
    assert f(0) < f(1) < f(2) == 1.0
    assert f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0, abs=1e-12)
    g = lr_lambda("linear", 0, 10)
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5)
    assert lr_lambda("constant", 1, 10)(9) == 1.0
    assert warmup_steps_for(None, 0.1, 50) == 5 and warmup_steps_for(3, 0.5, 50) == 3


def test_plan_from_rows_and_batch():
    from rayft.train.trainer import TrainingError, plan_steps

    t = TrainConfig(num_workers=2, micro_batch_size=2, gradient_accumulation_steps=2, epochs=2, warmup_ratio=0.1)
    plan = plan_steps(t, 103)  # 8 rows per step -> 12 steps per epoch, 7 rows left out
    assert (plan["steps_per_epoch"], plan["total_steps"], plan["warmup_steps"]) == (12, 24, 2)
    assert plan["rows_left_out_per_epoch"] == 7
    assert plan_steps(t.model_copy(update={"max_steps": 5}), 103)["total_steps"] == 5
    with pytest.raises(TrainingError, match="fewer than one optimizer step"):
        plan_steps(t, 7)


def test_early_stopping_patience_and_threshold():
    from rayft.train.early_stopping import observe_eval

    best, bad, stop = observe_eval(None, 0, 2.0, patience=2, threshold=0.1)
    assert (best, bad, stop) == (2.0, 0, False)
    best, bad, stop = observe_eval(best, bad, 1.95, patience=2, threshold=0.1)  # not better by more than 0.1
    assert (best, bad, stop) == (2.0, 1, False)
    assert observe_eval(best, bad, 1.95, patience=2, threshold=0.1) == (2.0, 2, True)
    assert observe_eval(best, bad, 1.5, patience=2, threshold=0.1) == (1.5, 0, False)
    assert observe_eval(2.0, 5, 3.0, patience=None, threshold=0.0) == (2.0, 6, False)
