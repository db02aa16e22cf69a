"""Per-worker shards in a real Ray Train run: 2 workers, DeepSpeed ZeRO-3 on gloo, the tiny model, the sample data.

The workers run rayft's own steps (`setup`, `micro_batches`, `train_step`, `evaluate` from train/loop.py) over the
shards `shard_datasets` cuts (train/shards.py), and record the rows of every step. Mid-epoch, one worker process
exits; Ray Train restarts the group (FailureConfig) and the new attempt skips to the step where the first stopped,
as a resume from a checkpoint does. Checked: the ranks' rows are disjoint, together they are the epoch the plan
counts, each attempt read exactly the rows the fixed cut gives that rank at that step, and an evaluation over eval
shards of unequal batch counts (ZeRO-3 forwards are collective) counts every eval token once and does not hang.
"""
import hashlib
import json
import os

import pytest

pytestmark = pytest.mark.slow

KILL_AT = 4  # the step at which rank 1 exits in the first attempt
EVAL_ROWS = 9  # 4 + 5 rows: with micro batches of 4, rank 0 has one eval batch and rank 1 two


def _row_key(input_ids) -> str:
    import numpy as np

    return hashlib.blake2b(np.asarray(input_ids, dtype=np.int64).tobytes(), digest_size=8).hexdigest()


def _loop(config: dict) -> None:
    """A training worker: rayft's own setup and steps, recording which rows each step took."""
    from rayft.train import loop

    state = loop.setup(config)
    out, gas = config["out"], state.train.accumulation_steps
    marker = os.path.join(out, "killed")
    attempt = 2 if os.path.exists(marker) else 1
    first = KILL_AT if attempt == 2 else 0
    batches = loop.micro_batches(state, skip=first * gas)  # what a resume at step KILL_AT does
    steps = {}
    for step in range(first, state.plan["steps_per_epoch"]):
        if attempt == 1 and step == KILL_AT and state.rank == 1:
            open(marker, "w").close()
            os._exit(1)  # the worker process dies; Ray Train restarts the group
        window = [next(batches) for _ in range(gas)]
        loop.train_step(state, window)
        steps[step] = [_row_key(ids) for rows in window for ids in rows["input_ids"]]
        with open(os.path.join(out, f"attempt{attempt}-rank{state.rank}.json"), "w") as f:
            json.dump({"steps": steps}, f)
    leftover = sum(len(rows["input_ids"]) for rows in batches)  # the rest of this rank's shard, read to its end
    metrics = loop.evaluate(state)
    with open(os.path.join(out, f"attempt{attempt}-rank{state.rank}.json"), "w") as f:
        json.dump({"steps": steps, "eval": metrics, "leftover_batches_rows": leftover}, f)


@pytest.fixture(scope="module")
def sharded_run(ray_local, repo_root, tiny_model_dir, tmp_path_factory):
    from ray.data import ExecutionOptions
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayft.cluster.config import load_config
    from rayft.train.shards import shard_datasets
    from rayft.train.trainer import plan_for, prepare_training_data

    root = tmp_path_factory.mktemp("shards")
    out = root / "rows"
    out.mkdir()
    cfg = load_config(repo_root / "examples" / "quickstart.yaml", [
        f"model.name_or_path={tiny_model_dir}", f"storage_path={root}", "train.num_workers=2",
        "train.micro_batch_size=4", "train.deepspeed.zero_stage=3", "data.max_seq_length=256",
        "tracking.enabled=false"])
    data = prepare_training_data(cfg, log=lambda _: None)
    data.eval = data.eval.limit(EVAL_ROWS).materialize()
    plan = plan_for(cfg.train, data)
    config = {"model": cfg.model.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json"), "plan": plan,
              "run_dir": str(root / "run"), "tracking": None, "progress": None, "out": str(out),
              "storage": cfg.storage.model_dump(mode="json"), "security": cfg.security.model_dump(mode="json")}
    trainer = TorchTrainer(
        _loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="shards", storage_path=str(root / "ray"), failure_config=FailureConfig(max_failures=1)),
        datasets=shard_datasets(data.train, data.eval, 2),
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )
    trainer.fit()
    ordered = [_row_key(r["input_ids"]) for r in data.train.iter_rows()]
    records = {}
    for name in os.listdir(out):
        if name.endswith(".json"):
            with open(out / name) as f:
                records[name.removesuffix(".json")] = json.load(f)
    from rayft.train.loss import count_loss_tokens

    eval_tokens = sum(count_loss_tokens(r["labels"]) for r in data.eval.iter_rows())
    return {"plan": plan, "ordered": ordered, "records": records, "killed": os.path.exists(out / "killed"),
            "eval_tokens": eval_tokens}


def _rows_of(records: dict, rank: int) -> dict[int, list]:
    """Rows per step of one rank: steps before the kill from the first attempt, the rest from the second."""
    first = {int(k): v for k, v in records[f"attempt1-rank{rank}"]["steps"].items() if int(k) < KILL_AT}
    second = {int(k): v for k, v in records[f"attempt2-rank{rank}"]["steps"].items()}
    assert min(second) == KILL_AT
    return {**first, **second}


def test_a_worker_died_and_the_group_restarted(sharded_run):
    assert sharded_run["killed"]
    assert {"attempt1-rank0", "attempt1-rank1", "attempt2-rank0", "attempt2-rank1"} <= set(sharded_run["records"])
    assert str(KILL_AT) not in sharded_run["records"]["attempt1-rank1"]["steps"]


def test_ranks_read_disjoint_rows_that_together_make_the_epoch(sharded_run):
    plan, ordered = sharded_run["plan"], sharded_run["ordered"]
    assert len(set(ordered)) == len(ordered), "the sample data's packed rows should be distinct"
    per_rank = [_rows_of(sharded_run["records"], r) for r in (0, 1)]
    for steps in per_rank:
        assert sorted(steps) == list(range(plan["steps_per_epoch"]))  # equal length: every step on every rank
    rows = [[k for s in sorted(steps) for k in steps[s]] for steps in per_rank]
    assert not set(rows[0]) & set(rows[1])
    assert len(rows[0]) == len(rows[1]) == len(set(rows[0])) == plan["steps_per_epoch"] * plan["rows_per_step"] // 2
    assert set(rows[0]) | set(rows[1]) <= set(ordered)
    assert len(set(ordered) - set(rows[0]) - set(rows[1])) == plan["rows_left_out_per_epoch"]


def test_each_rank_reads_its_own_fixed_range_before_and_after_the_restart(sharded_run):
    from rayft.train.shards import train_bounds

    ordered, plan = sharded_run["ordered"], sharded_run["plan"]
    for rank, (start, stop) in enumerate(train_bounds(len(ordered), 2)):
        got = _rows_of(sharded_run["records"], rank)
        used = plan["steps_per_epoch"] * plan["rows_per_step"] // 2
        assert [k for s in sorted(got) for k in got[s]] == ordered[start:start + used]
        # The second attempt of this rank read the rest of its own shard and nothing more.
        assert sharded_run["records"][f"attempt2-rank{rank}"]["leftover_batches_rows"] == (stop - start - used) // 4 * 4


def test_evaluation_over_unequal_eval_shards_counts_every_token_once(sharded_run):
    from rayft.train.shards import eval_bounds

    sizes = [stop - start for start, stop in eval_bounds(EVAL_ROWS, 2)]
    assert [-(-n // 4) for n in sizes] == [1, 2]  # rank 0 ran one padding forward
    a, b = (sharded_run["records"][f"attempt2-rank{r}"]["eval"] for r in (0, 1))
    assert a == b
    assert a["eval_tokens"] == sharded_run["eval_tokens"] > 0  # each eval row once, padding rows not at all
