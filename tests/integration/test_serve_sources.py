"""Adapters served from where training puts them: the MLflow registry (`models:/NAME/VERSION`, `models:/NAME@alias`),
a run's artifacts (`runs:/RUN_ID/path`) and a storage URI (`file://`), resolved by serve/sources.py on a real MLflow
with a SQLite tracking store. The engine is called directly (no Ray); tests/integration/test_serve_api.py serves a
registry adapter over HTTP."""
import pytest

ANSWER_A = "Yes, we are open from nine to five."
ANSWER_B = "No. Please call support."


@pytest.fixture(scope="module")
def registry(tiny_model_dir, toy_adapters, tmp_path_factory):
    """The toy adapters a and b logged as run artifacts; `bot` v1 = a, v2 = b, alias champion -> v2."""
    from rayft.registry.tracking import client
    from rayft.registry.versions import register_version

    root = tmp_path_factory.mktemp("serve-sources")
    uri = f"sqlite:///{root}/mlflow.db"
    c = client(uri)
    exp = c.create_experiment("serve-sources", artifact_location=f"file://{root}/mlartifacts")
    out = {"uri": uri, "root": root, "runs": {}, "folders": {}}
    for name in ("a", "b"):
        folder = toy_adapters[name]
        run = c.create_run(exp)
        c.log_artifacts(run.info.run_id, folder, artifact_path="adapter")
        c.set_terminated(run.info.run_id)
        register_version(uri, "bot", run.info.run_id, "adapter", {"kind": "adapter"})
        out["runs"][name], out["folders"][name] = run.info.run_id, folder
    c.set_registered_model_alias("bot", "champion", "2")
    return out


def _engine(tiny_model_dir, registry, adapters, cache_dir):
    from rayft.serve.engine import Engine
    from rayft.serve.sources import resolve

    return Engine(tiny_model_dir, adapters=adapters, adapter_cache_size=4,
                  resolve=lambda u: resolve(u, registry["uri"], cache_dir=str(cache_dir)))


def _ask(engine, adapters):
    from rayft.data.chat import render_prompt
    from rayft.serve.engine import GenRequest

    ids = engine.tokenizer(render_prompt([{"role": "user", "content": "hello"}], engine.tokenizer),
                           add_special_tokens=False)["input_ids"]
    return [t for t, _, _ in engine.generate_text([GenRequest(ids, 24, temperature=0.0, adapter=a) for a in adapters])]


def test_adapters_from_registry_version_alias_run_and_file_uri_share_a_batch(tiny_model_dir, registry, tmp_path):
    adapters = {"v1": "models:/bot/1", "champion": "models:/bot@champion", "run-a": f"runs:/{registry['runs']['a']}/adapter",
                "file-b": f"file://{registry['folders']['b']}"}
    engine = _engine(tiny_model_dir, registry, adapters, tmp_path / "cache")
    assert _ask(engine, ["v1", "champion", "run-a", "file-b", None]) == [ANSWER_A, ANSWER_B, ANSWER_A, ANSWER_B,
                                                                          _ask(engine, [None])[0]]
    assert engine.cache.stats.loads == 4
    # the downloads are copies in the cache folder; the file:// adapter is read in place
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir())  # each beside its .complete marker
    assert len(cached) == 3 and any(n.startswith("models__bot_1-") for n in cached), cached
    assert any(n.startswith("models__bot_2-") for n in cached), cached  # the alias was pinned to its version


def test_moving_the_alias_serves_the_new_version(tiny_model_dir, registry, tmp_path):
    from rayft.registry.tracking import client
    from rayft.serve.sources import resolve

    cache = str(tmp_path / "cache")
    first = resolve("models:/bot@champion", registry["uri"], cache_dir=cache)
    client(registry["uri"]).set_registered_model_alias("bot", "champion", "1")
    try:
        second = resolve("models:/bot@champion", registry["uri"], cache_dir=cache)
        assert second != first  # not the cached copy of v2
        engine = _engine(tiny_model_dir, registry, {"champion": "models:/bot@champion"}, cache)
        assert _ask(engine, ["champion"]) == [ANSWER_A]
    finally:
        client(registry["uri"]).set_registered_model_alias("bot", "champion", "2")
    assert resolve("models:/bot@champion", registry["uri"], cache_dir=cache) == first


@pytest.mark.parametrize("source", ["models:/bot/9", "models:/bot@canary", "models:/nobody/1", "runs:/0123abcd/adapter"])
def test_a_source_that_does_not_exist_is_a_load_error_naming_adapter_and_uri(tiny_model_dir, registry, tmp_path, source):
    from rayft.serve.adapters import AdapterLoadError

    engine = _engine(tiny_model_dir, registry, {"ghost": source, "ok": "models:/bot/2"}, tmp_path / "cache")
    with pytest.raises(AdapterLoadError, match=r"adapter 'ghost' .*could not be loaded: FileNotFoundError: could not "
                                               r"fetch '" + source):
        _ask(engine, ["ghost"])
    assert list((tmp_path / "cache").glob(".download-*")) == []  # no half-finished download left behind
    assert _ask(engine, ["ok"]) == [ANSWER_B]
