"""Per-token log-probabilities and full-vocabulary KL from a causal LM's logits, in chunks.

`token_logps(logits, labels)` is log pi(y_t | s_t) of each label, the same value as the naive
    torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)
but it never materialises a second (B, T, V) tensor: the forward pass gathers the label's logit and
subtracts a logsumexp computed a few rows at a time; the backward pass writes d/dz = onehot - softmax(z)
chunk by chunk straight into the one (B, T, V) gradient buffer autograd needs anyway.

`token_kl(policy_logits, ref_logits)` is KL(pi_ref(.|s_t) || pi_theta(.|s_t)) over the full vocabulary at
every position (TDPO's sequential KL, TBPO-A's exact correction; METHOD.md "TDPO" and "TBPO" point 2),
with gradient through the policy only: d KL / d z = softmax(z) - softmax(z_ref).

Both compute in float32 for bf16/fp16/fp32 logits (half precision is upcast one chunk at a time) and
return float32 values (float64 in, float64 out). Labels equal to `ignore_index` give 0 and receive
no gradient.

The next-token shift is implemented once, here: `shift_labels` turns input-aligned ids into labels
aligned with the logits that predict them.
"""

import torch

IGNORE_INDEX = -100
# Elements (rows x vocabulary) per chunk: 4M float32 = 16 MiB of temporaries at a time.
CHUNK_ELEMENTS = 1 << 22


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 for half-precision and float32 logits, float64 for float64 (gradcheck)."""
    return torch.promote_types(logits.dtype, torch.float32)


def _rows_per_chunk(vocab_size: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // vocab_size)


class _LogpsAndKL(torch.autograd.Function):
    """Label log-probs and/or KL(ref || policy) from one set of logits, with one gradient buffer.

    d logp / dz = onehot(y) - p and d KL / dz = p - q, so the combined gradient
    g_lp (onehot - p) + g_kl (p - q) is written chunk by chunk into a single (N, V) tensor.
    """

    @staticmethod
    def forward(ctx, logits, labels, ref_logits, ignore_index, chunk_elements):
        V = logits.shape[-1]
        flat = logits.reshape(-1, V)  # (N, V), a view
        N = flat.shape[0]
        ref = None if ref_logits is None else ref_logits.reshape(-1, V)
        dtype = _compute_dtype(logits)
        safe_labels = valid = None
        logps = kl = None
        if labels is not None:
            flat_labels = labels.reshape(-1)
            valid = flat_labels != ignore_index
            safe_labels = torch.where(valid, flat_labels, torch.zeros_like(flat_labels))
            logps = torch.empty(N, dtype=dtype, device=logits.device)
        if ref is not None:
            kl = torch.empty(N, dtype=dtype, device=logits.device)
        step = _rows_per_chunk(V, chunk_elements)
        for start in range(0, N, step):
            rows = slice(start, start + step)
            z = flat[rows].to(dtype)  # (n, V); no copy when already in the compute dtype
            log_norm = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1)
            if logps is not None:
                logps[rows] = (z.gather(1, safe_labels[rows, None]) - log_norm).squeeze(1)
            if kl is not None:
                log_q = torch.log_softmax(ref[rows].to(dtype), dim=-1)
                q = log_q.exp()
                # sum_v q (log q - log p), with log p formed first: folding log_norm in after the
                # sum cancels badly in float32 at large vocabularies (KL(p||p) came out -1e-2).
                # Three (n, V) temporaries per chunk.
                kl[rows] = q.mul_(log_q.sub_(z - log_norm)).sum(-1)
        if logps is not None:
            logps = logps.masked_fill(~valid, 0.0)
        ctx.save_for_backward(logits, safe_labels, valid, ref_logits)
        ctx.chunk_elements = chunk_elements
        shape = logits.shape[:-1]
        return (
            None if logps is None else logps.view(shape),
            None if kl is None else kl.view(shape),
        )

    @staticmethod
    def backward(ctx, grad_logps, grad_kl):
        logits, safe_labels, valid, ref_logits = ctx.saved_tensors
        V = logits.shape[-1]
        flat = logits.reshape(-1, V)
        N = flat.shape[0]
        ref = None if ref_logits is None else ref_logits.reshape(-1, V)
        dtype = _compute_dtype(logits)
        g_lp = None if grad_logps is None else (grad_logps.reshape(-1).to(dtype) * valid)[:, None]
        g_kl = None if (grad_kl is None or ref is None) else grad_kl.reshape(-1, 1).to(dtype)
        grad = torch.empty_like(flat)
        step = _rows_per_chunk(V, ctx.chunk_elements)
        for start in range(0, N, step):
            rows = slice(start, start + step)
            p = torch.softmax(flat[rows].to(dtype), dim=-1)  # (n, V)
            coef = torch.zeros(p.shape[0], 1, dtype=dtype, device=p.device)
            if g_kl is not None:
                coef = coef + g_kl[rows]
            if g_lp is not None:
                coef = coef - g_lp[rows]
            chunk = p.mul_(coef)  # (g_kl - g_lp) p
            if g_kl is not None:
                chunk -= g_kl[rows] * torch.softmax(ref[rows].to(dtype), dim=-1)
            if g_lp is not None:
                chunk.scatter_add_(1, safe_labels[rows, None], g_lp[rows])
            grad[rows] = chunk
        return grad.view_as(logits), None, None, None, None


def token_logps_and_kl(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logps(logits, labels)` and `token_kl(logits, ref_logits)` in one pass and one gradient
    buffer: what TDPO and TBPO-A need from the same policy logits.

    Returns:
        ((...) float32 log-probs, (...) float32 KL values).
    """
    _check_labels(logits, labels)
    _check_ref(logits, ref_logits)
    return _LogpsAndKL.apply(logits, labels, ref_logits.detach(), ignore_index, chunk_elements)


def _check_labels(logits, labels):
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")


def _check_ref(policy_logits, ref_logits):
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(
            f"policy logits {tuple(policy_logits.shape)} and reference logits "
            f"{tuple(ref_logits.shape)} differ in shape"
        )


def token_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Log-probability of each label under the softmax of its logits, in chunks.

    Args:
        logits: (..., V) any float dtype; position i's logits score labels[i].
        labels: (...) int64 token ids, `ignore_index` where there is no label.
        ignore_index: label value that yields 0 and no gradient.
        chunk_elements: rows x V processed at a time (memory / speed trade-off).

    Returns:
        (...) float32 log-probabilities, 0 at ignored positions.
    """
    _check_labels(logits, labels)
    return _LogpsAndKL.apply(logits, labels, None, ignore_index, chunk_elements)[0]


def token_kl(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """KL(pi_ref || pi_theta) over the full vocabulary at each position, in chunks.

    The naive equivalent is
        q = ref_logits.float().log_softmax(-1); p = policy_logits.float().log_softmax(-1)
        (q.exp() * (q - p)).sum(-1)
    Gradient flows into `policy_logits` only; `ref_logits` is treated as a constant.

    Args:
        policy_logits: (..., V) logits of pi_theta.
        ref_logits: (..., V) logits of pi_ref at the same positions.
        chunk_elements: rows x V processed at a time.

    Returns:
        (...) float32 KL values (>= 0).
    """
    _check_ref(policy_logits, ref_logits)
    return _LogpsAndKL.apply(
        policy_logits, None, ref_logits.detach(), IGNORE_INDEX, chunk_elements
    )[1]


def shift_labels(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits that predict them: position i's logits score token i+1.

    Args:
        input_ids: (B, L) token ids.
        loss_mask: (B, L) bool, True on tokens whose log-probability is wanted (the response).

    Returns:
        (B, L) int64 labels: labels[:, i] = input_ids[:, i+1] where loss_mask[:, i+1], else
        IGNORE_INDEX; the last column is always IGNORE_INDEX.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(loss_mask[:, 1:], input_ids[:, 1:], IGNORE_INDEX)
    return labels


def sample_tokens(
    logits: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """One token per position from softmax(logits), by Gumbel-max in chunks. (..., V) -> (...) int64.

    Uses the global RNG unless `generator` is given (so checkpoints that save RNG state resume it).
    """
    V = logits.shape[-1]
    flat = logits.detach().reshape(-1, V)
    out = torch.empty(flat.shape[0], dtype=torch.long, device=logits.device)
    step = _rows_per_chunk(V, chunk_elements)
    for start in range(0, flat.shape[0], step):
        z = flat[start : start + step].float()
        uniform = torch.rand(z.shape, generator=generator, device=z.device).clamp_(1e-20, 1.0)
        out[start : start + step] = (z - torch.log(-torch.log(uniform))).argmax(-1)
    return out.view(logits.shape[:-1])


def sampled_k3(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Schulman's k3 estimate of KL(pi_ref || pi_theta) per position from one fresh a ~ pi_ref.

    k3 = (rho - 1) - log rho, rho = pi_theta(a) / pi_ref(a): unbiased, >= 0, no full-vocabulary sum
    (TBPO-A as the paper's text states it). Gradient flows through log pi_theta(a).

    Returns:
        (...) float32 estimates.
    """
    _check_ref(policy_logits, ref_logits)
    tokens = sample_tokens(ref_logits, generator=generator, chunk_elements=chunk_elements)
    log_rho = token_logps(policy_logits, tokens, chunk_elements=chunk_elements) - token_logps(
        ref_logits.detach(), tokens, chunk_elements=chunk_elements
    )
    return torch.expm1(log_rho) - log_rho
