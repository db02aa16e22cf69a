"""lm-eval-harness as a metric source (optional: `pip install 'rayft[eval]'`), on local task files only.

Each task YAML is lm-eval's own format. Its data must be a local file: `dataset_path: json` (or csv, parquet,
text) with `dataset_kwargs: {data_files: ...}`; a relative data file is found next to the YAML. The harness runs
with the Hugging Face hub offline, so nothing is downloaded at run time.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .config import EvalError, LmEvalConfig

LOCAL_LOADERS = ("json", "csv", "parquet", "text", "arrow")


def task_files(paths: list[str]) -> list[Path]:
    out = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            out.extend(sorted(list(path.glob("*.yaml")) + list(path.glob("*.yml"))))
        elif path.is_file():
            out.append(path)
        else:
            raise EvalError(f"eval.lm_eval.tasks: {p!r} is neither a task YAML file nor a folder of them")
    if not out:
        raise EvalError(f"eval.lm_eval.tasks: {paths} holds no .yaml task file")
    return out


@contextlib.contextmanager
def local_tasks(paths: list[str]) -> Iterator[tuple[str, list[str]]]:
    """(a folder of the tasks with their data files made absolute, the task names), checked to be local."""
    import yaml

    with tempfile.TemporaryDirectory(prefix="rayft-lm-eval-") as tmp:
        names = []
        for f in task_files(paths):
            try:
                task = yaml.safe_load(f.read_text(encoding="utf-8"))
            except yaml.YAMLError as e:
                raise EvalError(f"eval.lm_eval.tasks: {f} is not plain YAML ({str(e).splitlines()[0]}); rayft runs "
                                f"self-contained local tasks (no !function tags)") from None
            if not isinstance(task, dict) or not task.get("task"):
                raise EvalError(f"eval.lm_eval.tasks: {f} has no `task:` name; it is not an lm-eval task file")
            loader = task.get("dataset_path")
            files = (task.get("dataset_kwargs") or {}).get("data_files")
            if loader not in LOCAL_LOADERS or not files:
                raise EvalError(
                    f"eval.lm_eval.tasks: {f} reads dataset_path {loader!r}"
                    f"{'' if files else ' without dataset_kwargs.data_files'}; rayft runs lm-eval offline, so a task "
                    f"must read a local file: dataset_path: json (or {', '.join(LOCAL_LOADERS[1:])}) with "
                    f"dataset_kwargs: {{data_files: {{test: data.jsonl}}}}")
            task["dataset_kwargs"]["data_files"] = _absolute(files, f.parent)
            (Path(tmp) / f.name).write_text(yaml.safe_dump(task), encoding="utf-8")
            names.append(str(task["task"]))
        yield tmp, names


def _absolute(files, base: Path):
    if isinstance(files, dict):
        return {k: _absolute(v, base) for k, v in files.items()}
    if isinstance(files, list):
        return [_absolute(v, base) for v in files]
    path = Path(str(files))
    path = path if path.is_absolute() else (base / path)
    if not path.is_file():
        raise EvalError(f"eval.lm_eval.tasks: data file {path} (named in a task next to it) does not exist")
    return str(path.resolve())


def run_tasks(model, tokenizer, cfg: LmEvalConfig) -> dict[str, float]:
    """`lm_eval/<task>/<metric>` -> value for every task and metric (standard errors left out)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError("eval.lm_eval needs lm-eval-harness: pip install 'rayft[eval]' (or remove eval.lm_eval)") from None
    if hasattr(model, "merge_and_unload"):  # a PEFT adapter: lm-eval takes a plain transformers model
        model = model.merge_and_unload()
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ[var] = "1"
    with local_tasks(cfg.tasks) as (folder, names):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size,
                  device=str(next(model.parameters()).device))
        out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                      task_manager=TaskManager(include_path=folder, include_defaults=False),
                                      log_samples=False, bootstrap_iters=0)
    figures = {}
    for task, values in (out or {}).get("results", {}).items():
        for key, value in values.items():
            metric = key.split(",")[0]
            if metric == "alias" or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            figures[f"lm_eval/{task}/{metric}"] = float(value)
    return figures
