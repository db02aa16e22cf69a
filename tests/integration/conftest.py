"""Fixtures shared by the serving tests: toy LoRA adapters trained once per session (serve/testing.py)."""
import pytest

ANSWER_A = "Yes, we are open from nine to five."
ANSWER_B = "No. Please call support."
ANSWER_C = "Maybe later."


@pytest.fixture(scope="session")
def toy_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    """Three adapters on the tiny model whose greedy answers to the training prompts are ANSWER_A/B/C.
    Read-only: tests that need to change an adapter copy it first."""
    from tests.serve_helpers import train_toy_adapter

    root = tmp_path_factory.mktemp("toy-adapters")
    return {
        "a": train_toy_adapter(tiny_model_dir, str(root / "a"), ANSWER_A),
        "b": train_toy_adapter(tiny_model_dir, str(root / "b"), ANSWER_B),
        "c": train_toy_adapter(tiny_model_dir, str(root / "c"), ANSWER_C, steps=30),
    }
