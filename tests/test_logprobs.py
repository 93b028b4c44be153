"""Chunked per-token log-probs and full-vocabulary KL against naive log_softmax, values and gradients."""

import pytest
import torch
from torch.testing import assert_close

from tokenratio.logprobs import (
    IGNORE_INDEX,
    sample_tokens,
    sampled_k3,
    shift_labels,
    token_kl,
    token_logps,
    token_logps_and_kl,
)
from tokenratio.memory import peak_tensor_bytes


def naive_logps(logits, labels):
    safe = labels.clamp_min(0)
    out = torch.log_softmax(logits.float(), -1).gather(-1, safe[..., None]).squeeze(-1)
    return out * (labels != IGNORE_INDEX)


def naive_kl(policy_logits, ref_logits):
    log_q = torch.log_softmax(ref_logits.float(), -1)
    log_p = torch.log_softmax(policy_logits.float(), -1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def random_inputs(dtype, B=3, T=11, V=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE_INDEX
    labels[2, -1] = IGNORE_INDEX
    return logits, labels


# bf16: our chunks compute in float32 from the same bf16 logits as the naive upcast, so they agree
# to float32 rounding; gradients are rounded to bf16 once.
TOLERANCE = {torch.float32: {}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [1, 100, 1 << 22])
def test_token_logps_matches_naive(dtype, chunk_elements):
    logits, labels = random_inputs(dtype)
    ours_in = logits.clone().requires_grad_()
    naive_in = logits.clone().requires_grad_()
    ours = token_logps(ours_in, labels, chunk_elements=chunk_elements)
    naive = naive_logps(naive_in, labels)
    assert ours.dtype == torch.float32
    assert_close(ours, naive, rtol=1e-5, atol=1e-5)
    weights = torch.randn(ours.shape)
    (ours * weights).sum().backward()
    (naive * weights).sum().backward()
    assert ours_in.grad.dtype == dtype
    assert_close(ours_in.grad, naive_in.grad, **TOLERANCE[dtype])
    assert (ours_in.grad[0, :4] == 0).all()  # ignored labels get no gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [1, 100, 1 << 22])
def test_token_kl_matches_naive(dtype, chunk_elements):
    policy, _ = random_inputs(dtype, seed=1)
    ref, _ = random_inputs(dtype, seed=2)
    ours_in, naive_in = policy.clone().requires_grad_(), policy.clone().requires_grad_()
    ours = token_kl(ours_in, ref, chunk_elements=chunk_elements)
    naive = naive_kl(naive_in, ref)
    assert_close(ours, naive, rtol=1e-5, atol=1e-5)
    assert (ours >= -1e-6).all()
    weights = torch.randn(ours.shape)
    (ours * weights).sum().backward()
    (naive * weights).sum().backward()
    assert_close(ours_in.grad, naive_in.grad, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_logps_and_kl_matches_naive(dtype):
    logits, labels = random_inputs(dtype, seed=3)
    ref, _ = random_inputs(dtype, seed=4)
    ours_in, naive_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    logps, kl = token_logps_and_kl(ours_in, labels, ref, chunk_elements=50)
    assert_close(logps, naive_logps(naive_in, labels), rtol=1e-5, atol=1e-5)
    assert_close(kl, naive_kl(naive_in, ref), rtol=1e-5, atol=1e-5)
    w1, w2 = torch.randn(logps.shape), torch.randn(kl.shape)
    ((logps * w1).sum() + (kl * w2).sum()).backward()
    ((naive_logps(naive_in, labels) * w1).sum() + (naive_kl(naive_in, ref) * w2).sum()).backward()
    assert_close(ours_in.grad, naive_in.grad, **TOLERANCE[dtype])


def test_gradcheck_float64():
    logits, labels = random_inputs(torch.float64, B=3, T=5, V=5)
    ref = torch.randn(3, 5, 5, dtype=torch.float64)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: token_logps(z, labels, chunk_elements=7), (logits,))
    assert torch.autograd.gradcheck(lambda z: token_kl(z, ref, chunk_elements=7), (logits,))
    assert torch.autograd.gradcheck(
        lambda z: token_logps_and_kl(z, labels, ref, chunk_elements=7), (logits,)
    )


def test_kl_is_zero_for_identical_distributions_and_ref_gets_no_gradient():
    logits, _ = random_inputs(torch.float32)
    ref = logits.clone().requires_grad_()
    kl = token_kl(logits, ref)
    assert torch.equal(kl, torch.zeros_like(kl))  # sum q (r - z) - lse_q + lse_p: exactly 0
    assert not kl.requires_grad  # ref is treated as a constant


def test_float32_kl_stays_accurate_on_peaky_logits_at_a_large_vocabulary():
    """Logits spread over +-25 (like a trained LM's) at V = 32k, close and distant distributions:
    the float32 KL is within 2e-5 nats + 1e-5 relative of a float64 computation (the old kernel's
    errors were of the same order), and never negative beyond that."""
    g = torch.Generator().manual_seed(6)
    z = torch.randn(64, 32_000, generator=g) * 6
    for ref in (
        z + 0.05 * torch.randn(z.shape, generator=g),
        torch.randn(z.shape, generator=g) * 6,
    ):
        log_q, log_p = ref.double().log_softmax(-1), z.double().log_softmax(-1)
        exact = (log_q.exp() * (log_q - log_p)).sum(-1)
        kl = token_kl(z, ref)
        assert ((kl.double() - exact).abs() < 2e-5 + 1e-5 * exact).all()
        assert kl.min() > -2e-5


def test_shape_errors_are_clear():
    logits, labels = random_inputs(torch.float32)
    with pytest.raises(ValueError, match="do not match"):
        token_logps(logits, labels[:, :-1])
    with pytest.raises(ValueError, match="differ in shape"):
        token_kl(logits, logits[:, :-1])


def test_sample_tokens_follow_the_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]]).expand(20_000, 4)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_tokens(logits, generator=g, chunk_elements=1000), minlength=4)
    assert_close(counts / 20_000, logits[0].softmax(-1), atol=0.01, rtol=0)


def test_sampled_k3_is_unbiased_and_differentiable():
    """Mean over fresh draws a ~ pi_ref of k3 equals KL(pi_ref || pi_theta) at each position."""
    g = torch.Generator().manual_seed(1)
    policy = torch.randn(4, 1, 30, generator=g).expand(4, 20_000, 30).contiguous()
    ref = torch.randn(4, 1, 30, generator=g).expand(4, 20_000, 30).contiguous()
    policy.requires_grad_()
    estimates = sampled_k3(policy, ref, generator=g)
    exact = naive_kl(policy[:, 0], ref[:, 0])
    assert_close(estimates.mean(1), exact, atol=0.03, rtol=0.03)
    assert (estimates >= 0).all()
    estimates.sum().backward()
    assert torch.isfinite(policy.grad).all() and policy.grad.abs().sum() > 0


def test_shift_labels():
    input_ids = torch.tensor([[5, 6, 7, 8, 9]])
    response = torch.tensor([[False, False, True, True, False]])
    assert shift_labels(input_ids, response).tolist() == [[-100, 7, 8, -100, -100]]


# Peak memory at a 128k vocabulary, counted exactly: the profiler records every allocation and free of
# torch's CPU allocator in order, so the running sum of their sizes is the live tensor memory beyond what
# existed before (autograd's saved tensors included). Naive log_softmax builds at least one more
# (B, T, V) float32 tensor (and its backward another); ours only the gradient autograd needs anyway.
# (An earlier version read the process's resident set, which this VM reports late or not at all.)


def _growth(mode: str, backward: bool) -> float:
    """Peak extra tensor memory of the log-prob + KL computation, in units of the logits' size."""
    torch.manual_seed(0)
    B, T, V = 2, 256, 128_256
    logits = torch.randn(B, T, V).requires_grad_(backward)
    ref = torch.randn(B, T, V)
    labels = torch.randint(0, V, (B, T))

    def step():
        if mode == "ours":
            logps, kl = token_logps_and_kl(logits, labels, ref)
        else:
            q, p = ref.log_softmax(-1), logits.log_softmax(-1)
            logps, kl = p.gather(-1, labels[..., None]).squeeze(-1), (q.exp() * (q - p)).sum(-1)
        out = (logps + kl).sum()
        if backward:
            out.backward()

    return peak_tensor_bytes(step) / logits.numel() / 4


@pytest.mark.slow
def test_peak_memory_at_128k_vocabulary():
    ours, naive = _growth("ours", False), _growth("naive", False)
    # Forward: ours needs two chunk temporaries (16 MiB each of 256 MiB), naive several full tensors.
    assert ours < 0.35, ours
    assert naive > 1.5, naive
    ours_bw, naive_bw = _growth("ours", True), _growth("naive", True)
    # Backward: one gradient buffer (1x) for ours; naive keeps p, q.exp() and more alive.
    assert ours_bw < 1.35, ours_bw
    assert naive_bw > ours_bw + 1, (naive_bw, ours_bw)


def test_fused_pass_returns_the_reference_log_probs_without_gradient():
    """return_ref_logps: token_logps(ref_logits) from the same sweep, a constant for autograd."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 5, 50, generator=g, requires_grad=True)
    ref = torch.randn(3, 5, 50, generator=g)
    labels = torch.randint(0, 50, (3, 5), generator=g)
    labels[0, 3:] = IGNORE_INDEX
    logps, kl, ref_logps = token_logps_and_kl(logits, labels, ref, return_ref_logps=True)
    assert_close(ref_logps, naive_logps(ref, labels))
    assert not ref_logps.requires_grad
    assert_close(logps, naive_logps(logits.detach(), labels))
    assert_close(kl, naive_kl(logits.detach(), ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_consuming_the_reference_logits_gives_the_same_gradient(dtype):
    """consume_ref_logits builds the policy gradient in the reference logits' memory: the values and
    gradients are those of the default path, and (same dtype) ref_logits holds that gradient."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(2, 7, 300, generator=g).to(dtype)
    ref = torch.randn(2, 7, 300, generator=g).to(dtype)
    labels = torch.randint(0, 300, (2, 7), generator=g)
    labels[1, 5:] = IGNORE_INDEX
    weights = torch.randn(2, 2, 7, generator=g)
    grads, outputs = [], []
    for consume in (False, True):
        logits = base.clone().requires_grad_()
        reference = ref.clone()
        logps, kl, ref_logps = token_logps_and_kl(
            logits, labels, reference, chunk_elements=600, return_ref_logps=True,
            consume_ref_logits=consume,
        )  # fmt: skip
        (weights[0] * logps + weights[1] * kl).sum().backward()
        grads.append(logits.grad)
        outputs.append((logps, kl, ref_logps))
    assert_close(grads[1], grads[0])
    for a, b in zip(*outputs, strict=True):
        assert_close(a, b)
    if dtype == torch.float32:
        assert torch.equal(reference, grads[1])  # the memory was reused, as documented


def test_token_logps_at_k_tokens_equals_k_naive_gathers_in_values_and_gradients():
    from tokenratio.logprobs import token_logps_at

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, dtype=torch.float64, generator=g).requires_grad_()
    tokens = torch.randint(0, 11, (2, 5, 3), generator=g)
    tokens[0, 1, 2] = tokens[0, 1, 0]  # the same token twice at one position
    tokens[1, 4] = IGNORE_INDEX
    weights = torch.randn(2, 5, 3, dtype=torch.float64, generator=g)
    fused = token_logps_at(logits, tokens, chunk_elements=22)  # 2 rows a chunk
    safe = tokens.clamp_min(0)
    naive = logits.log_softmax(-1).gather(-1, safe).masked_fill(tokens == IGNORE_INDEX, 0.0)
    torch.testing.assert_close(fused, naive)
    (grad,) = torch.autograd.grad((fused * weights).sum(), logits)
    (expected,) = torch.autograd.grad((naive * weights).sum(), logits)
    torch.testing.assert_close(grad, expected)
