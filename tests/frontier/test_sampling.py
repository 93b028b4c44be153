"""frontier/sampling.py draws from the model's own distribution: the first two tokens of 4,000
samples (one prompt forward, its cache expanded to 4,000 rows, left-padded beside a longer
prompt in the same batch) against the exact next-token probabilities of a tiny real Llama, by a
chi-square test on the tokens expected 5+ times; and the scores drawn in lockstep with a
reference are evaluate.sequence_scores' (which tests/frontier/test_sequence_kl.py checks against
an enumeration)."""

import copy

import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM

from tokenratio.frontier.evaluate import sequence_scores
from tokenratio.frontier.sampling import sample, sample_scored

N = 4000


def _chi_square_p(observed: torch.Tensor, probabilities: torch.Tensor, n: int) -> float:
    expected = probabilities.double() * n
    big = expected >= 5
    obs, exp = observed[big].double(), expected[big]
    if (~big).any():  # the rare tokens pooled into one bin
        obs = torch.cat([obs, observed[~big].sum()[None].double()])
        exp = torch.cat([exp, expected[~big].sum()[None]])
    exp = exp * obs.sum() / exp.sum()  # float rounding of the probabilities' total
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def test_the_first_two_tokens_follow_the_exact_distribution(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():  # random weights give a near-uniform softmax: make it peaked
        model.lm_head.weight.mul_(25)
    prompt = [1, 40, 41, 42, 43]
    V = model.config.vocab_size
    longer = [1, 50, 51, 52, 53, 54, 55, 56]  # in the same batch: `prompt` is left-padded
    drawn = sample(model, [prompt, longer], N, 2, eos_id=None, seed=1, batch_rows=2 * N)[0]
    assert len(drawn) == N and all(len(row) == 2 for row in drawn)
    first = torch.tensor([row[0] for row in drawn])
    second = torch.tensor([row[1] for row in drawn])
    with torch.no_grad():
        p1 = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        every = torch.tensor([[*prompt, v] for v in range(V)])
        p2_given = model(every).logits[:, -1].softmax(-1)  # (V, V): p(w | prompt, v)
    p2 = p1 @ p2_given
    assert _chi_square_p(torch.bincount(first, minlength=V), p1, N) > 1e-3
    assert _chi_square_p(torch.bincount(second, minlength=V), p2, N) > 1e-3
    # and the test can fail: the first token's counts against the second token's distribution
    assert _chi_square_p(torch.bincount(first, minlength=V), p2, N) < 1e-6


def test_rows_stop_at_their_end_of_sequence_token_and_prompts_keep_their_order(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [[1, 40, 41], [1, 50, 51, 52], [1, 60, 61]]
    eos = model.config.eos_token_id
    drawn = sample(model, prompts, 3, 6, eos_id=eos, seed=0)
    assert [len(rows) for rows in drawn] == [3, 3, 3]
    assert all(eos not in row and len(row) <= 6 for rows in drawn for row in rows)
    again = sample(model, prompts, 3, 6, eos_id=eos, seed=0)
    assert again == drawn  # seeded
    assert sample(model, prompts, 3, 6, eos_id=eos, seed=1) != drawn


def test_scores_drawn_in_lockstep_are_the_sequence_scores_of_the_samples(tiny_model_dir):
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        policy.lm_head.weight.mul_(4)
    prompts = [[1, 40, 41], [1, 50, 51, 52, 53, 54]]
    drawn = sample_scored(policy, reference, prompts, 5, 4, None, seed=2, batch_rows=10)
    rows = [(p, row) for p, rows in zip(prompts, drawn, strict=True) for row in rows]
    expected = sequence_scores(
        policy, reference, [p for p, _ in rows], [r["tokens"] for _, r in rows], pad_id=0
    )
    for (_, row), want in zip(rows, expected, strict=True):
        assert row["positions"] == len(row["tokens"]) == 4
        assert abs(row["kl"] - want["kl"]) < 1e-4 * max(1.0, want["kl"])
        assert abs(row["log_ratio"] - want["log_ratio"]) < 1e-4 * max(1.0, abs(want["log_ratio"]))
        assert row["kl"] > 0 and row["entropy"] > 0
