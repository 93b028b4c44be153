"""Evaluation metrics against hand-computed values."""

import math

import pytest
import torch

from tokenratio.eval.metrics import (
    distinct_n,
    length_controlled_win_rate,
    predictive_entropy,
    self_bleu,
    win_rate,
)


def test_predictive_entropy_of_top_k():
    """Two equal logits and the rest far below: top-2 entropy is log 2. A uniform distribution over
    50 tokens has top-20 entropy log 20 (renormalised over the top 20)."""
    two = torch.tensor([[0.0, 0.0] + [-50.0] * 8])
    assert predictive_entropy(two, torch.tensor([True]), top_k=2) == pytest.approx(math.log(2))
    uniform = torch.zeros(3, 4, 50)
    mask = torch.ones(3, 4, dtype=torch.bool)
    assert predictive_entropy(uniform, mask) == pytest.approx(math.log(20))
    mask[:, 2:] = False  # only masked positions count
    peaked = uniform.clone()
    peaked[:, 2:, 0] = 100.0
    assert predictive_entropy(peaked, mask) == pytest.approx(math.log(20))


def test_distinct_1_uses_word_and_punctuation_tokens():
    """'The cat, the cat.' -> The, cat, ',', the, cat, '.': 5 distinct of 6 ('The' != 'the')."""
    assert distinct_n("The cat, the cat.") == pytest.approx(5 / 6)
    assert distinct_n("a a a a", n=2) == pytest.approx(1 / 3)
    assert distinct_n("") == 0.0


def test_self_bleu_extremes():
    same = ["the quick brown fox jumps over the lazy dog"] * 5
    assert self_bleu(same) == pytest.approx(100.0)
    disjoint = ["alpha beta gamma delta", "one two three four", "red green blue cyan"]
    assert self_bleu(disjoint) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        self_bleu(["only one"])


def test_win_rate_and_standard_error():
    """[1, 0, 1, 0.5]: mean 0.625; sample variance 0.6875/3; SE = sqrt(var/4)."""
    mean, se = win_rate([1, 0, 1, 0.5])
    assert mean == pytest.approx(62.5)
    assert se == pytest.approx(100 * math.sqrt(0.6875 / 3 / 4))


def test_length_controlled_win_rate_removes_a_pure_length_effect():
    """Outcomes that depend only on length, sigma(3 tanh(d / sd)), give theta = 0: a raw win rate far
    above 50% but a length-controlled one of 50%."""
    g = torch.Generator().manual_seed(0)
    model = (torch.randint(50, 400, (400,), generator=g) + 60).tolist()
    base = torch.randint(50, 400, (400,), generator=g).tolist()
    d = torch.tensor(model, dtype=torch.float64) - torch.tensor(base, dtype=torch.float64)
    outcomes = torch.sigmoid(3 * torch.tanh(d / d.std())).tolist()
    raw, _ = win_rate(outcomes)
    lc, se = length_controlled_win_rate(outcomes, model, base, bootstrap=50)
    assert raw > 60
    assert lc == pytest.approx(50.0, abs=0.5)
    assert 0 < se < 5


def test_length_controlled_win_rate_keeps_a_quality_effect():
    """Same lengths, wins 3 of 4: no length signal, so LC equals the raw rate (up to the prior)."""
    lc, _ = length_controlled_win_rate([1, 1, 1, 0] * 25, [100] * 100, [100] * 100, bootstrap=10)
    assert lc == pytest.approx(75.0, abs=0.5)
