"""Config loading: strict fields, errors that say where and what, --set overrides, every shipped example parses."""
import re
from pathlib import Path

import pytest
import yaml

from rayft.cluster.config import (
    ConfigError,
    RayftConfig,
    apply_override,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
)

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))

MINIMAL = {
    "name": "run-1",
    "model": {"name_or_path": "runs/tiny-model"},
    "data": {"sources": [{"path": "a.jsonl"}, {"path": "b.csv", "schema": "openai"}]},
}


def write(tmp_path, raw, name="run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw), encoding="utf-8")
    return p


def with_(base, **changes):
    import copy

    raw = copy.deepcopy(base)
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for k in parents:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[int(last) if isinstance(node, list) else last] = value
    return raw


# --------------------------------------------------------------------------------------- good ones


def test_minimal_config_gets_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert isinstance(cfg, RayftConfig)
    assert cfg.name == "run-1" and cfg.storage_path == "./runs" and cfg.run_dir == "./runs/run-1"
    d = cfg.data
    assert (d.max_seq_length, d.packing, d.dedup, d.redact_pii, d.truncation) == (512, True, True, False, "drop_oldest_turns")
    assert d.sources[0].data_schema == "auto" and d.sources[1].data_schema == "openai"
    assert d.sources[0].display_name == "a" and d.sources[1].weight == 1.0
    assert cfg.ray.address is None
    assert cfg.model.tokenizer_name_or_path == "runs/tiny-model"


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_shipped_example_parses(example):
    cfg = load_config(example)
    assert cfg.data.sources
    # the dump of a loaded config is itself a valid config
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_examples_exist():
    names = [p.name for p in EXAMPLES]
    assert "quickstart.yaml" in names
    assert len(names) >= 2, "the quickstart and at least one real-model example"


def test_quickstart_sources_point_at_the_sample_data():
    cfg = load_config(REPO / "examples" / "quickstart.yaml")
    for s in cfg.data.sources:
        assert (REPO / s.path).is_file(), s.path


def test_dump_config_fills_every_default_with_user_field_names(tmp_path):
    text = dump_config(load_config(write(tmp_path, MINIMAL)))
    raw = yaml.safe_load(text)
    assert raw["data"]["packing"] is True
    assert raw["data"]["sources"][1]["schema"] == "openai"  # the alias, not data_schema
    assert "data_schema" not in text
    assert raw["data"]["max_seq_length"] == 512 and raw["data"]["eval_fraction"] == 0.1
    assert raw["ray"] == {"address": None, "num_cpus": None}


# ------------------------------------------------------------------------------------ field errors


def test_unknown_field_names_the_path_and_lists_allowed_fields(tmp_path):
    p = write(tmp_path, with_(MINIMAL, data__sources__0__shema="qa"))
    with pytest.raises(ConfigError, match=re.escape(
        "data.sources.0.shema: unknown field; allowed here: path, name, format, schema, column_map, weight, split, system_prompt"
    )):
        load_config(p)


def test_error_names_the_file(tmp_path):
    p = write(tmp_path, with_(MINIMAL, data__packing="maybe"))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(p))}: 1 problem\(s\) in the config\n  data\.packing: 'maybe' is not valid"):
        load_config(p)


@pytest.mark.parametrize("section, allowed", [
    ("data", "sources, max_seq_length, truncation, packing, dedup, redact_pii, eval_fraction, seed, chat_template"),
    ("ray", "address, num_cpus"),
])
def test_unknown_field_in_a_section(tmp_path, section, allowed):
    raw = dict(MINIMAL)
    raw[section] = dict(raw.get(section, {}), colour="blue")
    with pytest.raises(ConfigError, match=rf"  {section}\.colour: unknown field; allowed here: {allowed}"):
        load_config(write(tmp_path, raw))


def test_unknown_top_level_section(tmp_path):
    raw = dict(MINIMAL, trian={"lr": 1})
    with pytest.raises(ConfigError, match=r"  trian: unknown field; allowed here: name, storage_path, model, data, ray"):
        load_config(write(tmp_path, raw))


@pytest.mark.parametrize("path, value, message", [
    ("data__truncation", "cut", r"data\.truncation: 'cut' is not valid: Input should be 'drop_oldest_turns', 'truncate_end' or 'reject'"),
    ("data__sources__0__format", "xml", r"data\.sources\.0\.format: 'xml' is not valid: Input should be 'auto', 'json', 'jsonl', 'csv' or 'parquet'"),
    ("data__sources__1__schema", "chatml", r"data\.sources\.1\.schema: 'chatml' is not valid: Input should be 'auto', 'alpaca', 'sharegpt'"),
    ("data__sources__0__split", "test", r"data\.sources\.0\.split: 'test' is not valid: Input should be 'train' or 'eval'"),
    ("model__dtype", "fp8", r"model\.dtype: 'fp8' is not valid: Input should be 'auto', 'float32'"),
])
def test_wrong_literal(tmp_path, path, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, with_(MINIMAL, **{path: value})))


@pytest.mark.parametrize("path, value, message", [
    ("data__max_seq_length", 8, r"data\.max_seq_length: 8 is not valid: Input should be greater than or equal to 16"),
    ("data__sources__0__weight", 0, r"data\.sources\.0\.weight: 0 is not valid: Input should be greater than 0"),
    ("data__eval_fraction", 1.0, r"data\.eval_fraction: 1\.0 is not valid: Input should be less than 1"),
    ("data__sources__0__path", "  ", r"data\.sources\.0\.path: '  ' is not valid: path is empty; give a file, a glob or a folder"),
    ("name", "my run/1", r"name: 'my run/1' is not valid: must be 1-100 characters of letters, digits"),
    ("ray__num_cpus", 0, r"ray\.num_cpus: 0 is not valid: Input should be greater than or equal to 1"),
])
def test_bad_values(tmp_path, path, value, message):
    raw = dict(MINIMAL, ray={"num_cpus": 2})
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, with_(raw, **{path: value})))


def test_missing_fields(tmp_path):
    raw = {"name": "r", "data": {"sources": [{"name": "x"}]}}
    with pytest.raises(ConfigError, match=r"2 problem\(s\)") as info:
        load_config(write(tmp_path, raw))
    msg = str(info.value)
    assert "  model: required field is missing" in msg
    assert "  data.sources.0.path: required field is missing" in msg


def test_empty_source_list(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.sources: \[\] is not valid: List should have at least 1 item"):
        load_config(write(tmp_path, with_(MINIMAL, data__sources=[])))


def test_duplicate_source_names(tmp_path):
    raw = with_(MINIMAL, data__sources=[{"path": "x/a.jsonl"}, {"path": "y/a.jsonl"}])
    with pytest.raises(ConfigError, match=r"sources 0 and 1 are both named 'a'; give each a distinct `name`"):
        load_config(write(tmp_path, raw))


def test_all_problems_are_reported_at_once(tmp_path):
    raw = with_(MINIMAL, data__packing="maybe", data__truncation="cut")
    raw["data"]["sources"][0]["shema"] = "qa"
    with pytest.raises(ConfigError, match=r"3 problem\(s\) in the config") as info:
        load_config(write(tmp_path, raw))
    for field in ("data.packing", "data.truncation", "data.sources.0.shema"):
        assert f"  {field}: " in str(info.value)


# ------------------------------------------------------------------------------------- file errors


def test_file_missing(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(missing))}: no such config file$"):
        load_config(missing)


def test_folder_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path)


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just text\n", "str"), ("42\n", "int")])
def test_yaml_not_a_mapping(tmp_path, text, kind):
    with pytest.raises(ConfigError, match=rf"the top level must be a mapping of sections \(name, model, data, \.\.\.\), got a {kind}$"):
        load_config(write(tmp_path, text))


def test_yaml_syntax_error(tmp_path):
    p = write(tmp_path, "name: x\ndata: [1\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(p))}: not valid YAML: "):
        load_config(p)


def test_file_not_utf8(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text|not valid YAML"):
        load_config(p)


def test_empty_file_reports_the_required_sections(tmp_path):
    with pytest.raises(ConfigError, match=r"3 problem\(s\)") as info:
        load_config(write(tmp_path, ""))
    for field in ("name", "model", "data"):
        assert f"  {field}: required field is missing" in str(info.value)


# ------------------------------------------------------------------------------------------- --set


def test_set_overrides_scalars_with_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), [
        "data.max_seq_length=1024", "data.packing=false", "model.name_or_path=/models/x",
        "data.chat_template='{{ messages }}'", "storage_path=s3://bucket/runs", "data.seed=7",
        "tracking.tracking_uri=http://127.0.0.1:5000",
    ])
    assert cfg.data.max_seq_length == 1024 and cfg.data.packing is False
    assert cfg.model.name_or_path == "/models/x"
    assert cfg.data.chat_template == "{{ messages }}"
    assert cfg.storage_path == "s3://bucket/runs" and cfg.data.seed == 7


def test_set_into_a_list_index(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["data.sources.1.weight=2.5", "data.sources.0.split=eval", "data.sources.-1.name=last"])
    assert cfg.data.sources[1].weight == 2.5
    assert cfg.data.sources[0].split == "eval"
    assert cfg.data.sources[1].name == "last"


def test_set_creates_a_missing_section(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["ray.num_cpus=3", "data.sources.0.column_map.ticket=question"])
    assert cfg.ray.num_cpus == 3
    assert cfg.data.sources[0].column_map == {"ticket": "question"}


def test_set_a_whole_list(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["data.sources=[{path: x.jsonl, weight: 3}]"])
    assert len(cfg.data.sources) == 1 and cfg.data.sources[0].weight == 3


def test_set_does_not_change_the_input_dict():
    raw = {"name": "r", "model": {"name_or_path": "m"}, "data": {"sources": [{"path": "a.jsonl"}]}}
    config_from_dict(raw, overrides=["data.sources.0.weight=2"])
    assert "weight" not in raw["data"]["sources"][0]


def test_set_index_out_of_range(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("--set data.sources.5: '5' is not an index of this list (it has 2 items, 0-1)")):
        load_config(write(tmp_path, MINIMAL), ["data.sources.5.weight=2"])


def test_set_index_that_is_not_a_number(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("--set data.sources.first: 'first' is not an index of this list")):
        load_config(write(tmp_path, MINIMAL), ["data.sources.first.weight=2"])


def test_set_last_part_out_of_range(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("--set data.sources.2: '2' is not an index of this list (it has 2 items, 0-1)")):
        load_config(write(tmp_path, MINIMAL), ["data.sources.2={path: c.jsonl}"])


@pytest.mark.parametrize("item, message", [
    ("data.max_seq_length", r"--set 'data\.max_seq_length': expected KEY=VALUE, for example --set data\.max_seq_length=1024"),
    ("=3", r"--set '=3': the key '' is not a dotted field path such as train\.learning_rate"),
    ("data..seed=3", r"--set 'data\.\.seed=3': the key 'data\.\.seed' is not a dotted field path"),
    ("data.seed.=3", r"the key 'data\.seed\.' is not a dotted field path"),
    ("data.packing=[1", r"--set 'data\.packing=\[1': the value is not valid YAML"),
])
def test_bad_set_syntax(tmp_path, item, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, MINIMAL), [item])


def test_set_below_a_scalar(tmp_path):
    with pytest.raises(ConfigError, match=r"--set name\.x: its parent is a str, not a section"):
        load_config(write(tmp_path, MINIMAL), ["name.x=1"])
    with pytest.raises(ConfigError, match=r"--set data\.sources\.0\.path\.a\.b: data\.sources\.0\.path is a str, not a section"):
        load_config(write(tmp_path, MINIMAL), ["data.sources.0.path.a.b=1"])


def test_set_unknown_field_is_a_validation_error(tmp_path):
    with pytest.raises(ConfigError, match=r"  data\.sources\.0\.wieght: unknown field; allowed here: path, name"):
        load_config(write(tmp_path, MINIMAL), ["data.sources.0.wieght=2"])


def test_set_wrong_type_is_a_validation_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.max_seq_length: 'long' is not valid"):
        load_config(write(tmp_path, MINIMAL), ["data.max_seq_length=long"])


def test_parse_override_values():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("a=") == (["a"], "")
    assert parse_override("a=x=y") == (["a"], "x=y")
    assert parse_override(" a.0.c = null") == (["a", "0", "c"], None)


def test_apply_override_names_its_origin():
    with pytest.raises(ConfigError, match=r"^env RAYFT_X a\.9:"):
        apply_override({"a": [1]}, ["a", "9"], 2, origin="env RAYFT_X")


def test_remote_storage_without_a_tracking_server_is_a_config_error(tmp_path):
    """Found when the config loads, not after the data stage: the embedded SQLite store needs a local folder."""
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, MINIMAL), ["storage_path=s3://bucket/runs"])
    msg = str(e.value)
    assert "storage_path 's3://bucket/runs' is remote" in msg and "tracking.tracking_uri" in msg, msg
    assert "(top level)" not in msg and "{'data'" not in msg  # the message, not a dump of the whole config
    cfg = load_config(write(tmp_path, MINIMAL), ["storage_path=s3://bucket/runs", "tracking.enabled=false"])
    assert cfg.storage_root == "s3://bucket/runs" and cfg.registered_model_name is None
