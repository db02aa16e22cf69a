"""The A/B router of both serving engines (serve/gate.py): the split follows the weights, and a request that carries
OpenAI's `user` field stays on one version for that user."""
import math

from rayft.serve.config import ABSplit, ABVersion, ServeConfig
from rayft.serve.gate import Gate


def _gate(w1: float, w2: float, seed: int = 0) -> Gate:
    split = ABSplit(name="bot", versions=[ABVersion(label="v1", model="/a", weight=w1),
                                          ABVersion(label="v2", model="/b", weight=w2)])
    return Gate(ServeConfig(ab_split=split, seed=seed), "m", {})


def test_a_90_10_split_is_90_10_within_a_binomial_bound():
    n, p = 4000, 0.1
    for seed in (0, 1, 2):
        gate = _gate(9, 1, seed)
        v2 = sum(gate.route("bot")[0] == "v2" for _ in range(n))
        sd = math.sqrt(n * p * (1 - p))  # 19: a router ignoring the weights (2000 of 4000) is 100 sd away
        assert abs(v2 - n * p) < 4 * sd, (seed, v2)


def test_users_are_sticky_and_still_split_by_weight():
    gate = _gate(9, 1)
    first = {f"user-{i}": gate.route("bot", f"user-{i}")[0] for i in range(3000)}
    again = {u: gate.route("bot", u)[0] for u in first}
    assert again == first  # the same user, the same version, every time
    share = sum(v == "v2" for v in first.values()) / len(first)
    assert abs(share - 0.1) < 4 * math.sqrt(0.1 * 0.9 / len(first)), share
    # another gate (another replica, a restart) routes every user the same way
    assert {u: _gate(9, 1, seed=7).route("bot", u)[0] for u in list(first)[:200]} == dict(list(first.items())[:200])
