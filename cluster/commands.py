"""The `rayft` command table: every command, the module of `cluster/cli/` that implements it, its actions, and
whether it can run as a Ray job (`rayft submit FILE -- COMMAND`). The parser (`cluster/cli`) and the job
submission (`cluster/jobs.py`) both read this table; it imports nothing, so neither imports the other.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    module: str  # cluster/cli/<module>.py defines add_<name>(subparsers, command)
    help: str
    actions: tuple[str, ...] = ()  # `rayft data prepare`: the words after the command
    submittable: bool = False  # runs on a config FILE as a Ray job

    @property
    def file_words(self) -> int:
        """How many words name the command before its config FILE (`data prepare FILE`: 2)."""
        return 2 if self.actions else 1


COMMANDS: tuple[Command, ...] = (
    Command("init", "project", "write a starter project: a config, the sample data and cluster.yaml"),
    Command("config", "config", "check or print a config", ("validate", "show", "reference"), submittable=True),
    Command("tiny-model", "project", "write a tiny Llama + tokenizer for tests and the quickstart"),
    Command("data", "data", "prepare or inspect the training data", ("prepare", "inspect"), submittable=True),
    Command("quickstart", "project", "tiny model + sample data: tune, merge, register, serve, one chat request"),
    Command("train", "training", "LoRA fine-tuning on Ray Train with DeepSpeed; resumes a stopped run", submittable=True),
    Command("tune", "training", "Ray Tune search (ASHA) over training; crowns the best as champion", submittable=True),
    Command("run", "training", "the whole pipeline: data, tune (or train), export + merge, register + promote, serve",
            submittable=True),
    Command("models", "models", "the model registry: list, promote, rollback, delete",
            ("list", "promote", "rollback", "delete")),
    Command("eval", "evaluate", "task metrics on a golden set for a model, or two compared (paired bootstrap)",
            submittable=True),
    Command("export", "training", "write a run's adapter, and with --merge the merged model"),
    Command("serve", "serve", "OpenAI-compatible endpoint on Ray Serve (merged model, or base + LoRA adapters)",
            submittable=True),
    Command("plan", "cluster", "memory per GPU and tokens per step; the cluster.yaml worker type that fits"),
    Command("submit", "cluster", "run a rayft command on a Ray cluster as a job: rayft submit FILE -- train"),
    Command("jobs", "cluster", "list, inspect, follow or stop Ray jobs", ("list", "status", "logs", "stop")),
)

BY_NAME = {c.name: c for c in COMMANDS}
SUBMITTABLE = {c.name: c for c in COMMANDS if c.submittable}
