from types import SimpleNamespace

from rayft.registry.promotion import decide


def _champ(loss="2.0", fp="abc", version="3"):
    tags = {"dataset_fingerprint": fp}
    if loss is not None:
        tags["eval_loss"] = loss
    return SimpleNamespace(version=version, tags=tags)


def test_no_champion_promotes():
    assert decide("better_eval_loss", 0.0, 2.5, "abc", None) == (True, "there is no champion yet")


def test_better_on_the_same_eval_set_promotes():
    ok, why = decide("better_eval_loss", 0.0, 1.9, "abc", _champ())
    assert ok and "beats champion v3's 2.0000" in why


def test_not_better_enough_stays_challenger():
    ok, why = decide("better_eval_loss", 0.2, 1.9, "abc", _champ())
    assert not ok and "by more than 0.2" in why
    assert decide("better_eval_loss", 0.0, 2.1, "abc", _champ())[0] is False


def test_another_eval_set_is_not_compared():
    ok, why = decide("better_eval_loss", 0.0, 0.1, "new", _champ(fp="old"))
    assert not ok and "another eval set" in why


def test_policies_always_and_never():
    assert decide("always", 0.0, 9.0, "abc", _champ())[0] is True
    assert decide("never", 0.0, 0.1, "abc", None)[0] is False
