"""The search's task metric inside a real Ray Train group: 2 workers, DeepSpeed ZeRO-3 on gloo, the tiny model.

Under ZeRO-3 every forward is collective. The sample has 5 prompts, so with batches of 2 rank 0 answers 3 prompts
in 2 generate calls and rank 1 answers 2 in 1: without the equal call count and `synced_gpus`, rank 1 would stop
while rank 0 waits in a collective forever. Checked: the evaluation finishes, both ranks report the same score,
and it is the score of the same untrained adapter (LoRA's B starts at zero: the base model's answers) generated
in this process without DeepSpeed.
"""
import json
import os
from types import SimpleNamespace

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPTS = ["hello", "What are your opening hours?", "How do I reset my password?", "Where is the office?",
           "Can I get a refund?"]


def _worker(config: dict) -> None:
    import ray.train
    import torch

    from rayft.models.config import ModelConfig
    from rayft.train.config import TrainConfig
    from rayft.train.engine import build_engine
    from rayft.train.loop import task_metrics

    ctx = ray.train.get_context()
    train = TrainConfig.model_validate(config["train"])
    engine = build_engine(ModelConfig.model_validate(config["model"]), train, 0, 10, torch.device("cpu"),
                          log=lambda _: None)
    state = SimpleNamespace(engine=engine, rank=ctx.get_world_rank(), world=ctx.get_world_size(), train=train,
                            device=torch.device("cpu"))
    scores = task_metrics(state, config["payload"])
    with open(os.path.join(config["out"], f"rank{state.rank}.json"), "w") as f:
        json.dump(scores, f)


def test_task_metric_under_zero3_is_collective_and_matches_plain_generation(ray_local, tiny_model_dir, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayft.eval.config import EvalConfig
    from rayft.eval.generate import generate_answers
    from rayft.eval.golden import GoldenExample
    from rayft.eval.in_training import build_payload
    from rayft.eval.metrics import rouge_l

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = [GoldenExample(f"g:{i}", [{"role": "user", "content": p}], "we are open from nine to five")
                for i, p in enumerate(PROMPTS)]
    ecfg = EvalConfig(metrics=["rouge_l"], batch_size=2, search_max_new_tokens=12)
    payload = build_payload(examples, "rouge_l", ecfg, tok, {"name_or_path": tiny_model_dir})
    train = {"num_workers": 2, "cpus_per_worker": 0.5, "use_gpu": False, "lora": {"rank": 4, "alpha": 8},
             "deepspeed": {"zero_stage": 3}}
    trainer = TorchTrainer(_worker, train_loop_config={"model": {"name_or_path": tiny_model_dir}, "train": train,
                                                       "payload": payload, "out": str(tmp_path)},
                           scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(name="zero3-task", storage_path=str(tmp_path / "ray")))
    result = trainer.fit()
    assert result.error is None, result.error
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["rouge_l"] == ranks[1]["rouge_l"]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    answers = generate_answers(model.eval(), tok, payload["texts"], 12, 2)
    expected = sum(rouge_l(a, e.reference) for a, e in zip(answers, examples)) / len(examples)
    assert ranks[0]["rouge_l"] == pytest.approx(expected, abs=1e-9), (ranks, answers)
