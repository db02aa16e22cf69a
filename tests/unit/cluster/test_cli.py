"""The CLI as a user runs it: `python -m rayft.cluster.cli ...` and the installed `rayft` console script."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from rayft.cluster.config import RayftConfig

REPO = Path(__file__).resolve().parents[3]
QUICKSTART = REPO / "examples" / "quickstart.yaml"
VENV_BIN = Path(sys.executable).parent


def rayft_script() -> str:
    found = shutil.which("rayft", path=str(VENV_BIN))
    assert found, f"the rayft console script is not installed in {VENV_BIN}; run `pip install -e .`"
    return found


ENTRY_POINTS = {
    "module": lambda: [sys.executable, "-m", "rayft.cluster.cli"],
    "script": lambda: [rayft_script()],
}


def run(entry: str, *args, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    return subprocess.run(
        ENTRY_POINTS[entry]() + [str(a) for a in args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
    )


@pytest.fixture
def bad_config(tmp_path) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(
        "name: demo\nmodel: {name_or_path: m}\n"
        "data:\n  sources:\n    - path: a.jsonl\n      shema: qa\n",
        encoding="utf-8",
    )
    return p


@pytest.fixture
def minimal_config(tmp_path) -> Path:
    p = tmp_path / "minimal.yaml"
    p.write_text("name: demo\nmodel: {name_or_path: m}\ndata:\n  sources: [{path: a.jsonl}]\n", encoding="utf-8")
    return p


def test_console_script_is_the_cli_main():
    text = Path(rayft_script()).read_text()
    assert "from rayft.cluster.cli import main" in text


# -------------------------------------------------------------------------------------- validate


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_validate_good_file_exits_0(entry, tmp_path):
    r = run(entry, "config", "validate", QUICKSTART, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"{QUICKSTART}: valid (run 'quickstart', 5 source(s)" in r.stdout
    assert r.stderr == ""


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_validate_bad_file_exits_2_and_names_the_field(entry, bad_config, tmp_path):
    r = run(entry, "config", "validate", bad_config, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.startswith(f"error: {bad_config}: 1 problem(s) in the config")
    assert "data.sources.0.shema: unknown field; allowed here: path, name, format, schema" in r.stderr
    assert "Traceback" not in r.stderr


def test_validate_with_set_override(minimal_config, tmp_path):
    ok = run("script", "config", "validate", minimal_config, "--set", "data.max_seq_length=1024", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    bad = run("script", "config", "validate", minimal_config, "--set", "data.max_seq_length=4", cwd=tmp_path)
    assert bad.returncode == 2
    assert "data.max_seq_length: 4 is not valid: Input should be greater than or equal to 16" in bad.stderr


@pytest.mark.parametrize("args, message", [
    (["config", "validate", "missing.yaml"], "error: missing.yaml: no such config file"),
    (["config", "validate", "{cfg}", "--set", "data.sources.3.weight=2"], "error: --set data.sources.3: '3' is not an index of this list"),
    (["config", "validate", "{cfg}", "--set", "nokey"], "error: --set 'nokey': expected KEY=VALUE"),
])
def test_config_errors_exit_2(args, message, minimal_config, tmp_path):
    r = run("module", *[a.format(cfg=minimal_config) for a in args], cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [[], ["config"], ["config", "validate"], ["nonsense"], ["data", "prepare"]])
def test_usage_errors_exit_2(args, tmp_path):
    r = run("script", *args, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("usage: rayft")


def test_help_exits_0(tmp_path):
    r = run("script", "--help", cwd=tmp_path)
    assert r.returncode == 0
    for command in ("config", "tiny-model", "data", "quickstart"):
        assert command in r.stdout


# ------------------------------------------------------------------------------------------ show


def _field_names(model: type[BaseModel]) -> dict:
    """{yaml name: nested names or None} for every field of a config model."""
    import typing

    out = {}
    for name, f in model.model_fields.items():
        sub = None
        candidates = [f.annotation, *typing.get_args(f.annotation)]
        for c in candidates:
            if isinstance(c, type) and issubclass(c, BaseModel):
                sub = _field_names(c)
        out[f.alias or name] = sub
    return out


def _assert_has_every_field(shown: dict, names: dict, where=""):
    for key, sub in names.items():
        assert key in shown, f"{where}{key} missing from `config show`"
        value = shown[key]
        if sub is not None and isinstance(value, dict):
            _assert_has_every_field(value, sub, f"{where}{key}.")
        elif sub is not None and isinstance(value, list):
            for i, item in enumerate(value):
                _assert_has_every_field(item, sub, f"{where}{key}.{i}.")


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_show_prints_every_default(entry, minimal_config, tmp_path):
    r = run(entry, "config", "show", minimal_config, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "packing: true" in r.stdout
    assert "max_seq_length: 512" in r.stdout
    assert "truncation: drop_oldest_turns" in r.stdout
    assert "redact_pii: false" in r.stdout
    shown = yaml.safe_load(r.stdout)
    _assert_has_every_field(shown, _field_names(RayftConfig))
    assert shown["data"]["sources"][0] == {
        "path": "a.jsonl", "name": None, "format": "auto", "schema": "auto", "column_map": {},
        "weight": 1.0, "split": None, "system_prompt": None,
    }
    # what show prints is a config that loads to the same thing
    again = tmp_path / "again.yaml"
    again.write_text(r.stdout, encoding="utf-8")
    from rayft.cluster.config import load_config

    assert load_config(again) == load_config(minimal_config)


def test_show_applies_set(minimal_config, tmp_path):
    r = run("module", "config", "show", minimal_config, "--set", "data.packing=false", "--set", "data.sources.0.weight=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    shown = yaml.safe_load(r.stdout)
    assert shown["data"]["packing"] is False
    assert shown["data"]["sources"][0]["weight"] == 2.0


# ------------------------------------------------------------------------------------ tiny-model


def test_tiny_model_writes_a_loadable_model_and_tokenizer(tmp_path):
    out = tmp_path / "tiny"
    r = run("script", "tiny-model", out, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"tiny Llama and tokenizer written to {out}" in r.stdout
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files), "safetensors only"

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tok.chat_template, "the tokenizer must carry a chat template"
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(tok)
    assert tok.pad_token is not None and tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "How do I reset my password?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert tuple(logits.shape) == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()
    # the tokenizer was trained on the sample data: common words are single tokens, not bytes
    assert len(tok("password", add_special_tokens=False)["input_ids"]) <= 2


def test_tiny_model_width_is_a_flag_and_a_bad_width_is_refused(tmp_path):
    import json

    out = tmp_path / "wide"
    r = run("script", "tiny-model", out, "--hidden-size", "256", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["head_dim"], config["num_attention_heads"]) == (256, 64, 4)
    r = run("script", "tiny-model", tmp_path / "bad", "--hidden-size", "100", cwd=tmp_path)
    assert r.returncode == 2 and "error: --hidden-size 100: must be a positive multiple of 64" in r.stderr, r.stderr
    assert not (tmp_path / "bad").exists()


def test_missing_tokenizer_is_a_user_error(minimal_config, tmp_path):
    r = run("script", "data", "inspect", minimal_config, "--set", f"model.name_or_path={tmp_path / 'no-model'}", cwd=tmp_path)
    assert r.returncode == 2
    assert f"error: model.tokenizer '{tmp_path / 'no-model'}' cannot be loaded" in r.stderr
    assert "rayft tiny-model DIR" in r.stderr
    assert "Traceback" not in r.stderr
