"""`rayft submit` pieces that need no cluster: entrypoint, overrides, address, token lookup, CLI parsing.
The submission itself is tested against a real two-node local Ray in tests/e2e/test_submit.py."""
from pathlib import Path

import pytest

from rayft.cluster.cli import build_parser
from rayft.cluster.cli.cluster import _split_rest
from rayft.cluster.commands import BY_NAME, COMMANDS
from rayft.cluster.jobs import (
    DEFAULT_ADDRESS,
    JobError,
    build_entrypoint,
    find_auth_token,
    make_submission_id,
    overrides_in,
    resolve_address,
    stage_package,
)

ROOT = Path(__file__).resolve().parents[3]


def test_entrypoint_puts_the_config_after_the_command_words():
    ep, rel = build_entrypoint(str(ROOT / "examples/quickstart.yaml"), ["data", "prepare", "--set", "a=b c"], ROOT)
    assert ep == "python -m rayft.cluster.cli data prepare examples/quickstart.yaml --set 'a=b c'"
    assert rel == "examples/quickstart.yaml"
    ep, _ = build_entrypoint(str(ROOT / "examples/quickstart.yaml"), ["train", "--resume"], ROOT)
    assert ep == "python -m rayft.cluster.cli train examples/quickstart.yaml --resume"


@pytest.mark.parametrize("command,match", [
    ([], "nothing to run"),
    (["quickstart"], "cannot be submitted"),
    (["data"], "needs an action"),
    (["data", "explode"], "needs an action"),
])
def test_entrypoint_errors_say_what_to_write(command, match):
    with pytest.raises(JobError, match=match):
        build_entrypoint(str(ROOT / "examples/quickstart.yaml"), command, ROOT)


def test_config_outside_the_project_is_refused(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\n")
    with pytest.raises(JobError, match="inside the project folder"):
        build_entrypoint(str(f), ["data", "prepare"], ROOT)


def test_overrides_and_submission_id():
    assert overrides_in(["--set", "a=1", "--resume", "--set=b=2"]) == ["a=1", "b=2"]
    sid = make_submission_id("quick start", ["data", "prepare", "--set"])
    assert sid.startswith("rayft-quick-start-data-prepare-") and " " not in sid


def test_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) == DEFAULT_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:8265")
    assert resolve_address(None) == "http://10.0.0.1:8265"
    assert resolve_address("https://head:443") == "https://head:443"
    with pytest.raises(JobError, match="dashboard"):
        resolve_address("ray://head:10001")


def test_token_lookup_follows_rays_order(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert find_auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert find_auth_token() == "from-home"
    custom = tmp_path / "tok"
    custom.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(custom))
    assert find_auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert find_auth_token() == "from-env"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(JobError, match="RAY_AUTH_TOKEN_PATH"):
        find_auth_token()


def test_submit_options_before_and_after_the_file():
    args = build_parser().parse_args(["submit", "--env", "A=1", "examples/quickstart.yaml", "--no-wait",
                                      "--address", "h:1", "--env", "B=2", "--", "data", "prepare", "--set", "x=y"])
    assert _split_rest(args) == ["data", "prepare", "--set", "x=y"]
    assert (args.address, args.no_wait, args.env) == ("h:1", True, ["A=1", "B=2"])
    args = build_parser().parse_args(["submit", "examples/quickstart.yaml", "data", "prepare"])
    assert _split_rest(args) == ["data", "prepare"] and not args.no_wait


def _parser_commands(parser) -> dict[str, set]:
    """What argparse actually built: top-level commands with their actions."""
    import argparse

    def subparsers(p):
        return next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)

    return {name: set(getattr(subparsers(sp), "choices", {}) or {}) for name, sp in subparsers(parser).choices.items()}


def test_the_parser_is_the_command_table():
    built = _parser_commands(build_parser())
    assert list(built) == [c.name for c in COMMANDS]
    for c in COMMANDS:
        assert built[c.name] == set(c.actions), c.name
    assert BY_NAME["jobs"].actions == ("list", "status", "logs", "stop")


def test_staged_package_is_a_regular_rayft_package(tmp_path):
    """What `rayft submit` ships as py_modules: every subpackage (with the sample data), as a regular package that
    wins over a rayft installed on the cluster."""
    staged = stage_package(tmp_path)
    assert staged == tmp_path / "rayft" and (staged / "__init__.py").is_file()
    for sub in ("cluster/cli/__init__.py", "cluster/commands.py", "train/loop.py", "serve/app.py", "security/access.py",
                "models/load.py", "registry/versions.py", "examples/quickstart.yaml", "examples/data/kb.jsonl"):
        assert (staged / sub).is_file(), sub
    assert not list(staged.rglob("__pycache__"))
