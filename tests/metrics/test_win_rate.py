import math

import pytest
import torch

from lightning_refdpo.metrics import WinRate, win_rate

SCORES = [3.0, 1.0, 2.0, 2.0, 5.0]
BASELINE = [1.0, 2.0, 2.0, 0.0, 5.0]  # win, loss, tie, win, tie


def test_ties_count_half():
    assert win_rate(SCORES, BASELINE) == pytest.approx((2 + 0.5 * 2) / 5)


def test_ties_excluded():
    assert win_rate(SCORES, BASELINE, ties="exclude") == pytest.approx(2 / 3)


def test_against_itself_is_one_half():
    assert win_rate(torch.tensor(SCORES), torch.tensor(SCORES)) == 0.5
    assert math.isnan(win_rate(SCORES, SCORES, ties="exclude"))


def test_rejects_unpaired_scores_and_unknown_ties():
    with pytest.raises(ValueError, match="must pair up"):
        win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="ties must be"):
        win_rate(SCORES, BASELINE, ties="loss")
    with pytest.raises(ValueError, match="ties must be"):
        WinRate(ties="loss")


@pytest.mark.parametrize("ties", ["half", "exclude"])
def test_metric_accumulates_like_the_function(ties):
    metric = WinRate(ties=ties)
    metric.update(torch.tensor(SCORES[:2]), torch.tensor(BASELINE[:2]))
    metric.update(torch.tensor(SCORES[2:]), torch.tensor(BASELINE[2:]))
    assert metric.compute().item() == pytest.approx(win_rate(SCORES, BASELINE, ties=ties))
