"""The fused head (fused_head.py) against a naive log_softmax over the full logits: values and
gradients (rows, head weight, bias), with logit scaling and soft-capping, in tiles smaller than the
rows; the whole (rows x V) logits are never allocated."""

import pytest
import torch

from tokenratio.fused_head import Head, head_entropy, head_sample, head_values, tile_logits
from tokenratio.memory import peak_tensor_bytes

N, H, V = 37, 16, 101


def naive_logits(h, weight, bias, scale, cap):
    z = torch.nn.functional.linear(h, weight, bias).float()
    if scale:
        z = z * scale
    if cap:
        z = torch.tanh(z / cap) * cap
    return z


def naive(h, head: Head, tokens, ref_h, ref: Head):
    logp = naive_logits(h, head.weight, head.bias, head.scale, head.softcap).log_softmax(-1)
    ref_logp = naive_logits(ref_h, ref.weight, ref.bias, ref.scale, ref.softcap).log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return logp.gather(-1, tokens), kl, ref_logp.gather(-1, tokens)


@pytest.mark.parametrize(
    ("scale", "cap", "bias"),
    [(None, None, False), (0.5, None, True), (None, 3.0, False), (0.7, 2.0, True)],
    ids=["plain", "cohere-scale+bias", "gemma-softcap", "both"],
)
def test_values_and_gradients_equal_the_naive_log_softmax(scale, cap, bias):
    torch.manual_seed(0)
    h = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    b = torch.randn(V, requires_grad=True) if bias else None
    ref_h, ref_weight = torch.randn(N, H), torch.randn(V, H)
    tokens = torch.randint(0, V, (N, 2))
    g_at, g_kl = torch.randn(N, 2), torch.randn(N)
    leaves = [t for t in (h, weight, b) if t is not None]

    def grads(at, kl):
        for t in leaves:
            t.grad = None
        ((at * g_at).sum() + (kl * g_kl).sum()).backward()
        return [t.grad.clone() for t in leaves]

    head, ref = Head(weight, b, scale, cap), Head(ref_weight, None, scale, cap)
    fused = head_values(h, head, tokens, ref_h, ref, tile_rows=8)
    fused_grads = grads(fused[0], fused[1])
    expected = naive(h, head, tokens, ref_h, ref)
    expected_grads = grads(expected[0], expected[1])
    for got, want in zip(fused, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(fused_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_label_log_probs_alone_and_a_frozen_head():
    torch.manual_seed(1)
    h = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H)  # frozen (LoRA below it, a tied embedding)
    labels = torch.randint(0, V, (N, 1))
    at, kl, ref_at = head_values(h, Head(weight), labels, tile_rows=5)
    assert kl is None and ref_at is None
    at.sum().backward()
    want_h = h.detach().clone().requires_grad_()
    (
        naive_logits(want_h, weight, None, None, None).log_softmax(-1).gather(-1, labels)
    ).sum().backward()
    torch.testing.assert_close(h.grad, want_h.grad, rtol=1e-5, atol=1e-6)


def test_entropy_and_gumbel_max_samples_follow_the_distribution():
    torch.manual_seed(2)
    h, weight = torch.randn(N, H), torch.randn(V, H) * 0.3
    head = Head(weight)
    logp = naive_logits(h, weight, None, None, None).log_softmax(-1)
    torch.testing.assert_close(
        head_entropy(h, head, tile_rows=7), -(logp.exp() * logp).sum(-1), rtol=1e-5, atol=1e-5
    )
    rows = h[:1].expand(4000, H)
    tokens, logps = head_sample(rows, head, torch.Generator().manual_seed(0), tile_rows=512)
    torch.testing.assert_close(logps, logp[0, tokens], rtol=1e-5, atol=1e-5)
    frequency = torch.bincount(tokens, minlength=V).float() / len(tokens)
    assert (frequency - logp[0].exp()).abs().max() < 0.03  # 4000 draws: a few points at most


def test_no_tensor_of_rows_by_vocabulary_is_allocated():
    torch.manual_seed(3)
    rows, vocab, tile = 512, 8192, 32
    h = torch.randn(rows, 32, requires_grad=True)
    head = Head(torch.randn(vocab, 32))
    labels = torch.randint(0, vocab, (rows, 1))
    full = rows * vocab * 4

    def step():
        at, _, _ = head_values(h, head, labels, tile_rows=tile)
        at.sum().backward()

    peak = peak_tensor_bytes(step)
    assert peak < full / 4, (peak, full)
    assert tile_logits(h[:tile], head)[0].shape == (tile, vocab)
