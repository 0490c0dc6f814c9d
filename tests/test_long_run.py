"""`make bench-long`'s arithmetic (the run itself takes about 20 minutes: benchmarks/long_run.py)."""

from __future__ import annotations

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def long_run():
    return load_benchmark("long_run")


def test_an_iteration_runs_from_its_rollout_to_the_next_and_bookkeeping_is_the_rest(long_run) -> None:
    names = ["check_params", "rollout@1", "score@1", "advantages@1", "update@1",
             "rollout@2", "score@2", "advantages@2", "update@2", "evaluate"]
    starts = [0.0, 1.0, 2.0, 2.5, 3.0, 5.0, 6.0, 6.5, 7.5, 9.0]
    inside = [0.5, 0.6, 0.4, 0.1, 1.5, 0.7, 0.3, 0.2, 1.0, 0.9]
    timed = {"s": 10.0, "marks": list(zip(starts, names)), "inside_runs_s": list(zip(names, inside))}
    seconds, bookkeeping = long_run.per_iteration(timed, 2)
    assert seconds == [4.0, 4.0]  # 1.0 -> 5.0; 5.0 -> evaluate's start at 9.0
    assert bookkeeping == pytest.approx([4.0 - 2.6, 4.0 - 2.2])


def test_reward_at_a_kl_is_linear_between_points_and_flat_beyond(long_run) -> None:
    curve = [{"kl": 0.0, "reward": -0.1}, {"kl": 10.0, "reward": 0.5}, {"kl": 5.0, "reward": 0.3}]
    assert long_run.reward_at_kl(curve, 7.5) == pytest.approx(0.4)
    assert long_run.reward_at_kl(curve, 2.5) == pytest.approx(0.1)
    assert long_run.reward_at_kl(curve, 5.0) == pytest.approx(0.3)
    assert long_run.reward_at_kl(curve, 14.0) == 0.5  # never spent that much KL: its best, no extrapolation
    assert long_run.reward_at_kl(curve, -1.0) == -0.1
