"""The learning rate as a pure function of the iteration: warmup, steps, cosine."""

import pytest

from maskrcnn.config import SolverConfig
from maskrcnn.engine.schedule import lr_at, step_iterations


def test_warmup_is_linear_from_the_factor_to_the_base_rate():
    s = SolverConfig(base_lr=0.02, warmup_iters=100, warmup_factor=0.001, steps=(600, 800))
    assert lr_at(0, s, 1000) == pytest.approx(2e-5)
    assert lr_at(50, s, 1000) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert lr_at(100, s, 1000) == 0.02
    rates = [lr_at(i, s, 1000) for i in range(101)]
    assert rates == sorted(rates)


def test_multistep_decays_by_gamma_at_each_step():
    s = SolverConfig(base_lr=0.02, warmup_iters=0, steps=(600, 800), gamma=0.1)
    assert [lr_at(i, s, 1000) for i in (599, 600, 799, 800, 999)] == pytest.approx(
        [0.02, 0.002, 0.002, 0.0002, 0.0002])


def test_steps_below_one_are_fractions_of_max_iter():
    s = SolverConfig(base_lr=1.0, warmup_iters=0, steps=(0.5, 0.75), gamma=0.5)
    assert step_iterations(s, 400) == [200, 300]
    assert [lr_at(i, s, 400) for i in (199, 200, 300)] == [1.0, 0.5, 0.25]


def test_cosine_goes_from_the_base_rate_to_zero_and_stays_there():
    s = SolverConfig(base_lr=0.02, warmup_iters=0, schedule="cosine")
    assert lr_at(0, s, 1000) == 0.02
    assert lr_at(500, s, 1000) == pytest.approx(0.01)
    assert lr_at(1000, s, 1000) == pytest.approx(0.0) and lr_at(1200, s, 1000) == pytest.approx(0.0)


def test_warmup_multiplies_the_cosine():
    s = SolverConfig(base_lr=0.02, warmup_iters=10, warmup_factor=0.1, schedule="cosine")
    assert lr_at(5, s, 20) == pytest.approx(0.02 * 0.5 * (1 + 0.7071067811865476) * 0.55)
