"""Evaluation metrics as pure functions (docs/method.md §5): diversity, win rates.

- predictive_entropy: mean per-token entropy of the top-20 log-probs, renormalised.
- self_bleu: BLEU of each sample against the other samples of the same prompt (sacrebleu), averaged;
  lower = more diverse.
- distinct_n: unique n-grams / n-grams of one text, tokens = regex \\w+|[^\\w\\s].
- win_rate: mean outcome with its standard error (ties count 0.5).
- length_controlled_win_rate: alpaca_eval's idea, a logistic GLM
      P(win) = sigma(theta + phi * tanh(length_difference / sd))
  fitted by maximum likelihood; the length-controlled win rate is sigma(theta), the predicted win
  rate at equal lengths. Standard error by bootstrap over prompts.
"""

import math
import re

import torch

TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]")


def predictive_entropy(logits: torch.Tensor, mask: torch.Tensor, top_k: int = 20) -> float:
    """Mean over masked positions of the entropy of the renormalised top-k distribution.

    Args:
        logits: (..., V) raw logits at generated positions, or `logprobs.HeadRows` (the fused
            head: computed in row tiles at the masked positions only).
        mask: (...) bool, True where a token was generated.
        top_k: how many log-probs an API would return (paper: 20).
    """
    if not mask.any():
        return float("nan")
    if hasattr(logits, "hidden"):  # HeadRows: no (rows x V) logits
        from tokenratio.fused_head import head_entropy

        rows = logits.hidden[mask]
        k = min(top_k, logits.shape[-1])
        return float(head_entropy(rows, logits.head, tile_rows=logits.tile_rows, top_k=k).mean())
    top = torch.topk(logits.float(), min(top_k, logits.shape[-1]), dim=-1).values
    log_p = top.log_softmax(-1)  # renormalised over the top k
    entropy = -(log_p.exp() * log_p).sum(-1)
    return float(entropy[mask].mean())


def words(text: str) -> list[str]:
    return TOKEN_PATTERN.findall(text)


def distinct_n(text: str, n: int = 1) -> float:
    """Unique n-grams over all n-grams of one text (0 for a text shorter than n tokens)."""
    tokens = words(text)
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(samples: list[str]) -> float:
    """Mean sentence BLEU (0-100) of each sample against all the others."""
    from sacrebleu.metrics import BLEU

    if len(samples) < 2:
        raise ValueError("self-BLEU needs at least two samples")
    bleu = BLEU(effective_order=True)
    scores = [
        bleu.sentence_score(s, samples[:i] + samples[i + 1 :]).score for i, s in enumerate(samples)
    ]
    return sum(scores) / len(scores)


def win_rate(outcomes: list[float]) -> tuple[float, float]:
    """(mean, standard error) in percent; outcomes are 1 win, 0 loss, 0.5 tie."""
    n = len(outcomes)
    mean = sum(outcomes) / n
    variance = sum((o - mean) ** 2 for o in outcomes) / max(1, n - 1)
    return 100 * mean, 100 * math.sqrt(variance / n)


def _fit_glm(outcomes: torch.Tensor, length_term: torch.Tensor, iterations: int = 50, ridge=1e-2):
    """Maximum likelihood of sigma(theta + phi * x) on soft outcomes, by Newton's method, with a weak
    ridge prior so that all-win or separable outcomes stay finite."""
    X = torch.stack([torch.ones_like(length_term), length_term], 1).double()  # (n, 2)
    y = outcomes.double()
    w = torch.zeros(2, dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    for _ in range(iterations):
        p = torch.sigmoid(X @ w)
        gradient = X.T @ (y - p) - ridge * w
        hessian = (X * (p * (1 - p))[:, None]).T @ X + ridge * eye
        step = torch.linalg.solve(hessian, gradient)
        w = w + step
        if step.abs().max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def length_controlled_win_rate(
    outcomes: list[float],
    model_lengths: list[int],
    baseline_lengths: list[int],
    bootstrap: int = 200,
    seed: int = 0,
) -> tuple[float, float]:
    """(length-controlled win rate, bootstrap standard error), both in percent."""
    y = torch.tensor(outcomes, dtype=torch.float64)
    difference = torch.tensor(model_lengths, dtype=torch.float64) - torch.tensor(
        baseline_lengths, dtype=torch.float64
    )
    scale = difference.std() if len(outcomes) > 1 and difference.std() > 0 else 1.0
    x = torch.tanh(difference / scale)
    theta, _ = _fit_glm(y, x)
    g = torch.Generator().manual_seed(seed)
    estimates = []
    for _ in range(bootstrap):
        rows = torch.randint(0, len(outcomes), (len(outcomes),), generator=g)
        estimates.append(torch.sigmoid(torch.tensor(_fit_glm(y[rows], x[rows])[0])).item())
    spread = float(torch.tensor(estimates).std()) if bootstrap > 1 else float("nan")
    return 100 * torch.sigmoid(torch.tensor(theta)).item(), 100 * spread
