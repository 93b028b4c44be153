"""A sample's KL (frontier/evaluate.py) against an enumeration on a tiny real Llama: two new
tokens, every first token enumerated, so the exact sequence KL(pi || pi_ref) is known."""

import copy

import torch
from transformers import AutoModelForCausalLM

from tokenratio.frontier.evaluate import diversity, sequence_scores
from tokenratio.frontier.sampling import sample


def _kl(p_logits, q_logits):
    log_p, log_q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def test_each_samples_kl_is_its_positions_exact_kls_and_their_mean_the_sequence_kl(tiny_model_dir):
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        policy.lm_head.weight.mul_(8)  # peaked, and far from the reference
    prompt = [1, 40, 41, 42]
    V = reference.config.vocab_size
    with torch.no_grad():
        every = torch.tensor([[*prompt, v] for v in range(V)])
        p1 = policy(torch.tensor([prompt])).logits[0, -1]
        q1 = reference(torch.tensor([prompt])).logits[0, -1]
        kl2 = _kl(policy(every).logits[:, -1], reference(every).logits[:, -1])  # (V,): given y1
    kl1 = float(_kl(p1, q1))
    exact = kl1 + float(p1.softmax(-1) @ kl2)  # KL(pi || pi_ref) over two-token responses

    drawn = sample(policy, [prompt], 600, 2, eos_id=None, seed=3, batch_rows=600)[0]
    scores = sequence_scores(policy, reference, [prompt] * len(drawn), drawn, pad_id=0)
    for row, found in zip(drawn[:20], scores[:20], strict=True):
        assert abs(found["kl"] - (kl1 + float(kl2[row[0]]))) < 1e-4 * max(1.0, found["kl"])
    kls = torch.tensor([s["kl"] for s in scores])
    ratios = torch.tensor([s["log_ratio"] for s in scores])
    assert abs(float(kls.mean()) - exact) < 4 * float(kls.std()) / len(kls) ** 0.5
    assert abs(float(ratios.mean()) - exact) < 4 * float(ratios.std()) / len(ratios) ** 0.5
    assert kls.std() < ratios.std()  # the exact per-position sum varies less
    assert all(s["entropy"] >= 0 for s in scores)
    (empty,) = sequence_scores(policy, reference, [prompt], [[]], pad_id=0)
    assert empty == {"kl": 0.0, "log_ratio": 0.0, "entropy": 0.0}


def test_diversity_reads_a_prompts_samples():
    assert diversity(["a b a", "a b c"])["distinct_1"] == (2 / 3 + 1) / 2
    assert diversity(["a b", "a b"])["self_bleu"] > 99
