import pytest

from rayft.train.config import TrainConfig
from rayft.tune.search import SearchError, check_fits, trial_resources, trial_train_config


def test_one_worker_trials_run_two_at_a_time_on_two_cpus():
    assert trial_resources(TrainConfig(num_workers=1)) == {"CPU": pytest.approx(1.0)}
    assert check_fits(TrainConfig(num_workers=1), {"CPU": 2.0}, None) == 2
    assert check_fits(TrainConfig(num_workers=1), {"CPU": 2.0}, 1) == 1
    assert check_fits(TrainConfig(num_workers=2), {"CPU": 2.0}, None) == 1


def test_trial_workers_lend_the_driver_its_share():
    t = trial_train_config(TrainConfig(num_workers=2, cpus_per_worker=1.0))
    assert t.cpus_per_worker == pytest.approx(0.995)


def test_a_trial_that_can_never_fit_is_an_immediate_error():
    with pytest.raises(SearchError, match=r"one trial needs 3 CPU \(train.num_workers 3 x train.cpus_per_worker 1\) but the cluster has 2"):
        check_fits(TrainConfig(num_workers=3), {"CPU": 2.0}, None)
    with pytest.raises(SearchError, match=r"needs 2 GPU .* the cluster has 0"):
        check_fits(TrainConfig(num_workers=2, use_gpu=True), {"CPU": 8.0}, None)
