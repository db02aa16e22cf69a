"""The README's config reference is generated from the schema; a stale copy fails here."""
import subprocess
import sys
from pathlib import Path

from rayft.cluster.config import RayftConfig
from rayft.cluster.reference import BEGIN, END, readme_copy, render_reference

REPO = Path(__file__).resolve().parents[3]
RAYFT = str(Path(sys.executable).with_name("rayft"))


def _leaf_paths(model, prefix=""):
    from rayft.cluster.reference import _nested_model

    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        nested = _nested_model(field.annotation)
        yield key + (nested[1] if nested else "")
        if nested:
            yield from _leaf_paths(nested[0], key + nested[1] + ".")


def test_readme_reference_is_current():
    copy = readme_copy((REPO / "README.md").read_text(encoding="utf-8"))
    assert copy is not None, f"README.md lost its config reference markers ({BEGIN} ... {END})"
    assert copy == render_reference(), (
        "README.md's config reference is stale: the schema changed. Run `rayft config reference --write README.md` "
        "and commit the result")


def test_every_field_is_in_the_reference_with_a_description():
    text = render_reference()
    for path in _leaf_paths(RayftConfig):
        assert f"| `{path}` |" in text, f"{path} is missing from the config reference"
    undocumented = [line.split("|")[1].strip() for line in text.splitlines()
                    if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert not undocumented, f"fields without a description (add description= to the Field): {undocumented}"


def test_the_reference_names_real_defaults():
    text = render_reference()
    assert '| `data.max_seq_length` | int | `512` |' in text
    assert '| `train.deepspeed.zero_stage` | `0` \\| `1` \\| `2` \\| `3` | `2` |' in text
    assert '| `name` | str | **required** |' in text


def test_cli_prints_and_writes_the_reference(tmp_path):
    out = subprocess.run([RAYFT, "config", "reference"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == render_reference(), out.stderr
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{BEGIN}\nold\n{END}\noutro\n")
    out = subprocess.run([RAYFT, "config", "reference", "--write", str(doc)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "updated" in out.stdout, out.stderr
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and readme_copy(text) == render_reference()
    out = subprocess.run([RAYFT, "config", "reference", "--write", str(tmp_path / "none.md")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "--write" in out.stderr, out.stderr
