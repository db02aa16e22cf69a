import pytest
from pydantic import ValidationError

from rayft.train.config import TrainConfig
from rayft.tune.config import TuneConfig, canonical_key
from rayft.tune.space import SearchSpaceError, apply_params, numeric_fields, to_tune_space, validate_space


def _tune(space, **kw):
    return TuneConfig.model_validate({"search_space": space, **kw})


def test_short_keys_mean_the_train_section():
    assert canonical_key("lora.rank") == "train.lora.rank"
    assert canonical_key("train.learning_rate") == "train.learning_rate"


def test_numeric_fields_cover_lora_and_optimizer_but_not_flags():
    fields = numeric_fields()
    assert fields["train.lora.rank"] is int
    assert fields["train.lora.alpha"] is float
    assert fields["train.learning_rate"] is float
    assert "train.use_gpu" not in fields and "train.shuffle" not in fields
    assert "train.lora.target_modules" not in fields


def test_valid_space_and_trial_config():
    t = _tune({"lora.rank": {"choice": [4, 8]}, "lora.alpha": {"times": "lora.rank", "factor": 2},
               "train.learning_rate": {"loguniform": [1e-4, 1e-2]}})
    kinds = validate_space(t, TrainConfig())
    assert kinds == {"train.lora.rank": int, "train.lora.alpha": float, "train.learning_rate": float}
    trial = apply_params(TrainConfig(), {"train.lora.rank": 4, "train.lora.alpha": 8.0, "train.learning_rate": 3e-3})
    assert (trial.lora.rank, trial.lora.alpha, trial.learning_rate) == (4, 8.0, 3e-3)


def test_unknown_field_is_named_with_the_searchable_ones():
    t = _tune({"lora.rnak": {"choice": [4]}})
    with pytest.raises(SearchSpaceError, match=r"tune.search_space.lora.rnak: 'train.lora.rnak' is not a numeric field.*train.lora.rank"):
        validate_space(t, TrainConfig())


def test_a_value_the_field_refuses_is_an_error_naming_it():
    t = _tune({"lora.rank": {"choice": [8, 0]}})
    with pytest.raises(SearchSpaceError, match=r"the value 0 is not valid for train.lora.rank"):
        validate_space(t, TrainConfig())


def test_integer_field_refuses_continuous_distribution():
    t = _tune({"lora.rank": {"uniform": [4, 16]}})
    with pytest.raises(SearchSpaceError, match="integer"):
        validate_space(t, TrainConfig())


def test_times_must_refer_to_a_searched_field():
    with pytest.raises(ValidationError, match="refers to a field that is not searched"):
        _tune({"lora.alpha": {"times": "lora.rank"}})


def test_bad_distribution_shape_is_rejected():
    with pytest.raises(ValidationError):
        _tune({"lora.rank": {"choose": [4]}})
    with pytest.raises(ValidationError, match="must be > 0"):
        _tune({"train.learning_rate": {"loguniform": [0, 1e-2]}})


def test_tune_space_samples_rule():
    from ray.tune.search.sample import Categorical, Float
    space = to_tune_space(_tune({"lora.rank": {"choice": [4, 8]}, "lora.alpha": {"times": "lora.rank", "factor": 2},
                                 "train.learning_rate": {"loguniform": [1e-4, 1e-2]}}))
    assert isinstance(space["train.lora.rank"], Categorical)
    assert isinstance(space["train.learning_rate"], Float)
    assert "train.lora.alpha" in space


def test_optuna_refuses_rules_and_grids_at_config_load(repo_root):
    """Ray's OptunaSearch takes distributions only: a `times:` rule (sample_from) or a grid fails at load, with the
    field named and what to write instead, not after the data is prepared."""
    from rayft.cluster.config import ConfigError, load_config

    quickstart = repo_root / "examples" / "quickstart.yaml"
    with pytest.raises(ConfigError, match=r"tune: .* is not valid: search_space.lora.alpha: a `times: lora.rank` "
                                          r"rule cannot be searched with algorithm: optuna.*or use algorithm: random"):
        load_config(quickstart, ["tune.algorithm=optuna", "tune.search_space={lora.rank: {choice: [4, 8]}, "
                                 "lora.alpha: {times: lora.rank, factor: 2}}"])
    with pytest.raises(ValidationError, match=r"search_space.lora.rank: `grid: \[4, 8\]` cannot be searched with "
                                              r"algorithm: optuna.*write `choice: \[4, 8\]`"):
        _tune({"lora.rank": {"grid": [4, 8]}}, algorithm="optuna")
    assert _tune({"lora.rank": {"choice": [4, 8]}, "lora.alpha": {"uniform": [4, 32]}}, algorithm="optuna")
    assert _tune({"lora.rank": {"grid": [4, 8]}, "lora.alpha": {"times": "lora.rank"}})  # random takes both
