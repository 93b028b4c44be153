"""Per-token log-probabilities and full-vocabulary KL from a causal LM's logits, in chunks.

`token_logps(logits, labels)` is log pi(y_t | s_t) of each label, the same value as the naive
    torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)
but it never materialises a second (B, T, V) tensor: the forward pass gathers the label's logit and
subtracts a logsumexp computed a few rows at a time; the backward pass writes d/dz = onehot - softmax(z)
chunk by chunk straight into the one (B, T, V) gradient buffer autograd needs anyway.

`token_kl(policy_logits, ref_logits)` is KL(pi_ref(.|s_t) || pi_theta(.|s_t)) over the full vocabulary at
every position (TDPO's sequential KL, TBPO-A's exact correction; docs/method.md §2 TDPO and §3.2),
with gradient through the policy only: d KL / d z = softmax(z) - softmax(z_ref).

Both compute in float32 for bf16/fp16/fp32 logits (half precision is upcast one chunk at a time) and
return float32 values (float64 in, float64 out). Labels equal to `ignore_index` give 0 and receive
no gradient.

The next-token shift is implemented once, here: `shift_labels` turns input-aligned ids into labels
aligned with the logits that predict them.

Every function here also takes `HeadRows` in place of logits: the final hidden states and the LM
head, from which `fused_head` computes the same values in row tiles, only at the positions that
hold a token, so the (rows x V) logits are never built (train.fused_head; docs/method.md, "The
fused head").
"""

import torch

from tokenratio.fused_head import Head, head_sample, head_values, rows_per_tile, tile_logits

IGNORE_INDEX = -100
# Elements (rows x vocabulary) per chunk: 4M float32 = 16 MiB of temporaries at a time.
CHUNK_ELEMENTS = 1 << 22


class HeadRows:
    """Logits not built: hidden states (..., H) and the head that would turn them into (..., V).

    `index` (flat positions that hold a token, e.g. `PreferenceBatch.token_index`): the values
    are computed there only and are 0 at every other position (KL and samples included), which
    callers mask anyway; without it, the positions whose first token is not ignored."""

    def __init__(self, hidden, head: Head, tile_rows: int | None = None, index=None):
        self.hidden, self.head, self.index = hidden, head, index
        self.tile_rows = tile_rows or rows_per_tile(head.weight.shape[0])  # default tile size

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.head.weight.shape[0]))

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def requires_grad(self) -> bool:
        return self.hidden.requires_grad  # computed under no_grad: nothing to differentiate

    def float(self) -> "HeadRows":
        return self  # the kernels compute in float32 tile by tile

    def detach(self) -> "HeadRows":
        head = Head(self.head.weight.detach(), _detach(self.head.bias), *_caps(self.head))
        return HeadRows(self.hidden.detach(), head, self.tile_rows, self.index)

    def __getitem__(self, index) -> "HeadRows":
        return HeadRows(self.hidden[index], self.head, self.tile_rows)  # every position

    def materialize(self) -> torch.Tensor:
        """The full (..., V) float32 logits (small uses only: explain's per-token view)."""
        flat = self.hidden.reshape(-1, self.hidden.shape[-1])
        return tile_logits(flat, self.head)[0].view(self.shape)


def _detach(tensor):
    return None if tensor is None else tensor.detach()


def _caps(head: Head) -> tuple:
    return head.scale, head.softcap


def _fused(rows: HeadRows, tokens, ref: HeadRows | None = None, valid=None, ignore=IGNORE_INDEX):
    """(log pi at tokens (..., k), KL (...) or None, log pi_ref at tokens or None) computed only
    at the positions `valid` (default: where tokens[..., 0] is not `ignore`); 0 elsewhere and at
    ignored tokens."""
    if ref is not None and ref.shape != rows.shape:
        raise ValueError(f"policy {tuple(rows.shape)} and reference {tuple(ref.shape)} differ")
    width = rows.hidden.shape[-1]
    flat_tokens = tokens.reshape(-1, tokens.shape[-1])
    index = rows.index
    if index is None:  # found here: one wait for the device (scoring passes, tests)
        keep = (flat_tokens[:, 0] != ignore) if valid is None else valid.reshape(-1)
        index = keep.nonzero()[:, 0]
    h = rows.hidden.reshape(-1, width).index_select(0, index)
    ref_h = None if ref is None else ref.hidden.reshape(-1, width).index_select(0, index).detach()
    picked = flat_tokens.index_select(0, index)
    at, kl, ref_at = head_values(
        h, rows.head, picked, ref_h, None if ref is None else ref.detach().head,
        tile_rows=rows.tile_rows,
    )  # fmt: skip
    ignored = picked == ignore
    shape = tokens.shape[:-1]

    def spread(values, k=None):
        if values is None:
            return None
        if k is not None:
            values = values.masked_fill(ignored, 0.0)
        full = values.new_zeros((flat_tokens.shape[0], *values.shape[1:]))
        return full.index_copy(0, index, values).view(*shape, *values.shape[1:])

    return spread(at, True), spread(kl), spread(ref_at, True)


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 for half-precision and float32 logits, float64 for float64 (gradcheck)."""
    return torch.promote_types(logits.dtype, torch.float32)


def _rows_per_chunk(vocab_size: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // vocab_size)


class _LogpsAndKL(torch.autograd.Function):
    """Label log-probs and/or KL(ref || policy) from one set of logits, with one gradient buffer.

    Forward, a chunk of rows at a time: the policy's log-normaliser lse_p and its labels' log-probs;
    with reference logits r also lse_q, the reference's label log-probs (returned, without
    gradient: the reference pass needs no second sweep) and
        KL = sum_v q_v (log q_v - log p_v) = sum_v q_v (r_v - z_v) - lse_q + lse_p    (sum_v q_v = 1),
    one dot product per row. (Expanding the KL as sum q log q - sum q z cancels badly in float32
    at large vocabularies; sum q (r - z) does not: it is 0 when r = z and small when they are close.)

    Backward: d logp / dz = onehot(y) - p and d KL / dz = p - q, so the gradient
    g_lp (onehot - p) + g_kl (p - q) = (g_kl - g_lp) p - g_kl q + g_lp onehot is written chunk by
    chunk straight into the one (N, V) gradient buffer, with p = exp(z - lse_p) and q = exp(r - lse_q)
    rebuilt from the two saved log-normalisers (N floats each) rather than by softmax again. With
    `consume_ref`, that buffer is the reference logits' own memory (each chunk of r is read, then
    overwritten by its gradient): the reference logits must stay alive until the backward for q,
    and this way they are all the backward needs, as in DPO, instead of one more (N, V) buffer.
    """

    @staticmethod
    def forward(ctx, logits, labels, ref_logits, ignore_index, chunk_elements, consume_ref):
        V = logits.shape[-1]
        flat = logits.reshape(-1, V)  # (N, V), a view
        N = flat.shape[0]
        ref = None if ref_logits is None else ref_logits.reshape(-1, V)
        dtype = _compute_dtype(logits)

        def per_row():
            return torch.empty(N, dtype=dtype, device=logits.device)

        lse_p, lse_q = per_row(), None if ref is None else per_row()
        safe_labels = valid = logps = ref_logps = kl = None
        if labels is not None:  # (N, k): k labels per row (k = 1 but for `token_logps_at`)
            flat_labels = labels.reshape(N, -1)
            valid = flat_labels != ignore_index
            safe_labels = torch.where(valid, flat_labels, torch.zeros_like(flat_labels))
            logps = torch.empty(flat_labels.shape, dtype=dtype, device=logits.device)
            ref_logps = None if ref is None else torch.empty_like(logps)
        if ref is not None:
            kl = per_row()
        step = _rows_per_chunk(V, chunk_elements)
        for start in range(0, N, step):
            rows = slice(start, start + step)
            z = flat[rows].to(dtype)  # (n, V); no copy when already in the compute dtype
            if ref is None:
                lse_p[rows] = torch.logsumexp(z, dim=-1)
                if logps is not None:
                    logps[rows] = z.gather(1, safe_labels[rows]) - lse_p[rows, None]
                continue
            r = ref[rows].to(dtype)
            log_p = torch.log_softmax(z, dim=-1)  # (n, V); the same kernel gives lse for free:
            log_q = torch.log_softmax(r, dim=-1)  # lse = z_0 - log p_0
            lse_p[rows] = z[:, 0] - log_p[:, 0]
            lse_q[rows] = r[:, 0] - log_q[:, 0]
            if logps is not None:
                logps[rows] = log_p.gather(1, safe_labels[rows])
                ref_logps[rows] = log_q.gather(1, safe_labels[rows])
            q = log_q.exp_()  # two (n, V) temporaries per chunk: q and r - z (in log_p's buffer)
            kl[rows] = (
                torch.linalg.vecdot(q, torch.sub(r, z, out=log_p)) - lse_q[rows] + lse_p[rows]
            )
        if logps is not None:
            logps = logps.masked_fill(~valid, 0.0)
        if ref_logps is not None:
            ref_logps = ref_logps.masked_fill(~valid, 0.0)
        ctx.save_for_backward(logits, safe_labels, valid, ref_logits, lse_p, lse_q)
        ctx.chunk_elements = chunk_elements
        ctx.consume_ref = (
            consume_ref
            and ref_logits is not None
            and ref_logits.dtype == logits.dtype
            and ref_logits.is_contiguous()
        )
        shape = logits.shape[:-1]
        label_shape = shape if labels is None else labels.shape
        outputs = [
            None if t is None else t.view(s)
            for t, s in ((logps, label_shape), (kl, shape), (ref_logps, label_shape))
        ]
        if outputs[2] is not None:
            ctx.mark_non_differentiable(outputs[2])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_logps, grad_kl, _grad_ref_logps):
        logits, safe_labels, valid, ref_logits, lse_p, lse_q = ctx.saved_tensors
        V = logits.shape[-1]
        flat = logits.reshape(-1, V)
        N = flat.shape[0]
        ref = None if ref_logits is None else ref_logits.reshape(-1, V)
        dtype = _compute_dtype(logits)
        g_lp = None  # (N, k)
        if grad_logps is not None:
            g_lp = grad_logps.reshape(N, -1).to(dtype) * valid
        g_kl = None if (grad_kl is None or ref is None) else grad_kl.reshape(-1, 1).to(dtype)
        grad = ref if ctx.consume_ref else torch.empty_like(flat)  # (N, V)
        in_place = grad.dtype == dtype  # half-precision logits: compute in float32, then cast
        step = _rows_per_chunk(V, ctx.chunk_elements)
        for start in range(0, N, step):
            rows = slice(start, start + step)
            z = flat[rows].to(dtype)
            q = None
            if g_kl is not None:  # read r before its memory (with consume_ref) is overwritten
                q = torch.sub(ref[rows].to(dtype), lse_q[rows, None]).exp_()
            out = grad[rows] if in_place else torch.empty_like(z)  # (n, V)
            torch.sub(z, lse_p[rows, None], out=out).exp_()  # p
            coef = torch.zeros_like(out[:, :1])
            if g_kl is not None:
                coef = coef + g_kl[rows]
            if g_lp is not None:
                coef = coef - g_lp[rows].sum(1, keepdim=True)
            out.mul_(coef)  # (g_kl - g_lp) p
            if q is not None:
                out.sub_(q.mul_(g_kl[rows]))
            if g_lp is not None:
                out.scatter_add_(1, safe_labels[rows], g_lp[rows])
            if not in_place:
                grad[rows] = out
        return grad.view_as(logits), None, None, None, None, None


def token_logps_and_kl(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_elements: int = CHUNK_ELEMENTS,
    return_ref_logps: bool = False,
    consume_ref_logits: bool = False,
) -> tuple[torch.Tensor, ...]:
    """`token_logps(logits, labels)` and `token_kl(logits, ref_logits)` in one pass and one gradient
    buffer: what TDPO and TBPO-A need from the same policy logits.

    Args:
        return_ref_logps: also return `token_logps(ref_logits, labels)` (no gradient), computed in
            the same pass over the reference logits.
        consume_ref_logits: build the gradient of `logits` in the memory of `ref_logits` (same dtype,
            contiguous): peak memory as without the KL, but `ref_logits` holds that gradient after
            the backward. Only for callers that own `ref_logits` and are done with it.

    Returns:
        ((...) float32 log-probs, (...) float32 KL values[, (...) reference log-probs]).
    """
    _check_labels(logits, labels)
    _check_ref(logits, ref_logits)
    if isinstance(logits, HeadRows):
        at, kl, ref_at = _fused(logits, labels[..., None], ref_logits, ignore=ignore_index)
        return (at[..., 0], kl, ref_at[..., 0]) if return_ref_logps else (at[..., 0], kl)
    logps, kl, ref_logps = _LogpsAndKL.apply(
        logits, labels, ref_logits.detach(), ignore_index, chunk_elements, consume_ref_logits
    )
    return (logps, kl, ref_logps) if return_ref_logps else (logps, kl)


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
    if isinstance(logits, HeadRows):
        return _fused(logits, labels[..., None], ignore=ignore_index)[0][..., 0]
    return _LogpsAndKL.apply(logits, labels, None, ignore_index, chunk_elements, False)[0]


def token_logps_at(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Log-probabilities of k tokens per position in one sweep over the logits (one normaliser,
    one gradient buffer): `token_logps` of each `tokens[..., j]`, as a cached k3 step needs for
    the label and the sampled token together.

    Args:
        logits: (..., V); tokens: (..., k) int64, `ignore_index` where there is none.

    Returns:
        (..., k) float32 log-probabilities, 0 at ignored entries.
    """
    if logits.shape[:-1] != tokens.shape[:-1]:
        raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}")
    if isinstance(logits, HeadRows):
        return _fused(logits, tokens, ignore=ignore_index)[0]
    return _LogpsAndKL.apply(logits, tokens, None, ignore_index, chunk_elements, False)[0]


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
    if isinstance(policy_logits, HeadRows):
        every = torch.ones(policy_logits.shape[:-1], dtype=torch.bool, device=policy_logits.device)
        zeros = torch.zeros((*policy_logits.shape[:-1], 1), dtype=torch.long, device=every.device)
        return _fused(policy_logits, zeros, ref_logits, valid=every)[1]
    return _LogpsAndKL.apply(
        policy_logits, None, ref_logits.detach(), IGNORE_INDEX, chunk_elements, False
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
    if isinstance(logits, HeadRows):
        rows = logits.detach()
        flat_h = rows.hidden.reshape(-1, rows.hidden.shape[-1])
        generator = generator or torch.default_generator
        if rows.index is None:
            tokens = head_sample(flat_h, rows.head, generator, tile_rows=rows.tile_rows)[0]
            return tokens.view(logits.shape[:-1])
        picked = flat_h.index_select(0, rows.index)
        drawn = head_sample(picked, rows.head, generator, tile_rows=rows.tile_rows)[0]
        tokens = torch.zeros(flat_h.shape[0], dtype=torch.long, device=flat_h.device)
        return tokens.index_copy(0, rows.index, drawn).view(logits.shape[:-1])
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
    tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Schulman's k3 estimate of KL(pi_ref || pi_theta) per position from one fresh a ~ pi_ref
    (or at the given `tokens`, e.g. a cache's samples).

    k3 = (rho - 1) - log rho, rho = pi_theta(a) / pi_ref(a): unbiased, >= 0, no full-vocabulary sum
    (TBPO-A as the paper's text states it). Gradient flows through log pi_theta(a).

    Returns:
        (...) float32 estimates.
    """
    _check_ref(policy_logits, ref_logits)
    if tokens is None:
        tokens = sample_tokens(ref_logits, generator=generator, chunk_elements=chunk_elements)
    log_rho = token_logps(policy_logits, tokens, chunk_elements=chunk_elements) - token_logps(
        ref_logits.detach(), tokens, chunk_elements=chunk_elements
    )
    return torch.expm1(log_rho) - log_rho
