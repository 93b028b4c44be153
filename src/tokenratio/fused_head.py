"""Per-token values straight from hidden states and the LM head, in row tiles: the (rows x V)
logits are never built whole (docs/method.md, "The fused head").

For rows h (N, H), a head (weight W (V, H), optional bias b, Cohere's `logit_scale` s, Gemma-2's
`final_logit_softcapping` c) and the logits z = c tanh(s (h W^T + b) / c) of one tile of rows at a
time, `head_values` returns:
    at (N, k)   log pi(a_j | row) of k given tokens per row (the labels; for TBPO-A's k3, also a
                token a ~ pi_ref), with gradients;
    kl (N,)     KL(pi_ref || pi) over the whole vocabulary against a reference head on its own
                rows (docs/method.md, the KL of TDPO and exact TBPO-A), with gradients to the policy;
    ref_at      log pi_ref(a_j) of the same tokens (no gradient).
The gradient is computed in the forward, as Liger's fused losses do, but kept linear in the
upstream gradients so that any loss can sit on top: with p = softmax(z), f' = dz/d(pre-cap logit)
and g the upstream gradients,
    d/dh = sum_j g_j (f'_{a_j} s W_{a_j} - s E_p[f' W]) + g_kl s (E_p[f' W] - E_pref[f' W]),
so the forward keeps E_p[f' W] and E_pref[f' W] (N, H each) and f'_{a_j} s, and the backward is
a few (N, H) products. The head's own gradient (a trained or LoRA-adapted head) needs p per tile:
the backward recomputes the tiles then, and only then. `head_entropy` and `head_sample` (Gumbel-max
over the tiles, seeded) complete what eval and the reference cache read.
"""

from dataclasses import dataclass

import torch

Tensor = torch.Tensor
TILE_ELEMENTS = 1 << 23  # rows x vocabulary per tile (train.head_tile_elements): 32 MiB of fp32


def rows_per_tile(vocab_size: int, tile_elements: int = TILE_ELEMENTS) -> int:
    """A tile's rows: its size, not its row count, is bounded (65 rows at 128k, 1,024 at 8k)."""
    return max(1, tile_elements // vocab_size)


@dataclass(frozen=True)
class Head:
    """An LM head as the kernels read it (`modeling.output_head` builds it from a model)."""

    weight: Tensor  # (V, H): may require grad (a trained head, or LoRA's merged view)
    bias: Tensor | None = None
    scale: float | None = None  # Cohere's logit_scale
    softcap: float | None = None  # Gemma-2's final_logit_softcapping


def tile_logits(h: Tensor, head: Head, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(z, f') of one tile: the float32 logits and dz/d(h W^T + b), both (rows, V). With `out`
    (a float32 (rows, V) buffer) z is written there: the kernels reuse their tile buffers."""
    z = _linear_into(h, head, out)
    slope = torch.full_like(z[:, :1], 1.0)
    if head.scale is not None:
        z.mul_(head.scale)  # z is this call's own tensor (fresh, or the caller's buffer)
        slope = slope * head.scale
    if head.softcap is not None:  # out of place: tanh's backward reads its output
        t = torch.tanh(z / head.softcap)
        slope = slope * (1 - t * t)
        z = t * head.softcap
    return z, slope.expand_as(z)


def _linear_into(h: Tensor, head: Head, out: Tensor | None) -> Tensor:
    if out is None:
        return torch.nn.functional.linear(h, head.weight, head.bias).float()
    if h.dtype == head.weight.dtype == torch.float32:
        if head.bias is None:
            return torch.matmul(h, head.weight.T, out=out)
        return torch.addmm(head.bias.float(), h, head.weight.T, out=out)
    return out.copy_(torch.nn.functional.linear(h, head.weight, head.bias))


def _tile_buffers(count: int, rows: int, vocab: int, like: Tensor) -> list[Tensor]:
    """`count` float32 (rows, V) tiles in one allocation, reused by every tile of a pass: one
    block per pass rather than three per tile, which glibc's heap kept resident in holes
    (docs/perf.md, the head rows' resident memory)."""
    block = torch.empty(count, rows, vocab, dtype=torch.float32, device=like.device)
    return list(block.unbind(0))


class _HeadValues(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, tokens, ref_h, ref_weight, ref_bias, spec, tile_rows):
        head = Head(weight, bias, spec[0], spec[1])
        ref = None if ref_h is None else Head(ref_weight, ref_bias, spec[2], spec[3])
        N, k = tokens.shape
        at = h.new_zeros(N, k, dtype=torch.float32)
        ref_at = at.clone() if ref is not None else None
        kl = h.new_zeros(N, dtype=torch.float32) if ref is not None else None
        slopes = at.clone()
        grads = ctx.needs_input_grad[0]  # none kept for a frozen model's rows (reference, eval)
        expected = h.new_zeros(N, h.shape[1] if grads else 0, dtype=torch.float32)
        expected_ref = expected.clone() if ref is not None else None
        w = weight.float()
        # three tiles live, in reused buffers: A holds z, then p, then z_ref, then p_ref; B holds
        # log p; C holds log p_ref, then log p_ref - log p
        a, b, c = _tile_buffers(3, min(tile_rows, N), weight.shape[0], h)
        for start in range(0, N, tile_rows):
            rows = slice(start, start + tile_rows)
            n = min(tile_rows, N - start)
            z, slope = tile_logits(h[rows], head, a[:n])
            logp = torch._log_softmax(z, -1, False, out=b[:n])
            p = torch.exp(logp, out=a[:n])
            tok = tokens[rows].clamp_min(0)
            at[rows] = logp.gather(-1, tok)
            slopes[rows] = slope.gather(-1, tok)
            if grads:
                expected[rows] = _expected(p, slope, w, head)
            if ref is not None:
                zr, _ = tile_logits(ref_h[rows], ref, a[:n])
                ref_logp = torch._log_softmax(zr, -1, False, out=c[:n])
                ref_p = torch.exp(ref_logp, out=a[:n])
                ref_at[rows] = ref_logp.gather(-1, tok)
                if grads:
                    expected_ref[rows] = _expected(ref_p, slope, w, head)
                # KL(p_ref || p) row by row as a batched dot product: no fourth tile
                ref_logp.sub_(logp)
                kl[rows] = (ref_p.unsqueeze(1) @ ref_logp.unsqueeze(2)).view(-1)
        ctx.spec, ctx.tile_rows, ctx.with_ref = spec, tile_rows, ref is not None
        ctx.save_for_backward(h, weight, bias, tokens, ref_h, ref_weight, ref_bias, slopes,
                              expected, expected_ref)  # fmt: skip
        ctx.mark_non_differentiable(*[t for t in (ref_at,) if t is not None])
        return at, kl, ref_at

    @staticmethod
    def backward(ctx, grad_at, grad_kl, _grad_ref_at):
        h, weight, bias, tokens = ctx.saved_tensors[:4]
        slopes, expected, expected_ref = ctx.saved_tensors[7:]
        w = weight.float()
        tok = tokens.clamp_min(0)
        grad_at = torch.zeros_like(slopes) if grad_at is None else grad_at.float()
        total = grad_at.sum(-1, keepdim=True)
        grad_h = None
        if ctx.needs_input_grad[0]:
            # sum_j g_j f'_{a_j} W_{a_j} - (sum_j g_j) E_p[f'W] + g_kl (E_p[f'W] - E_pref[f'W])
            grad_h = torch.einsum("nk,nkh->nh", grad_at * slopes, w[tok]) - total * expected
            if ctx.with_ref and grad_kl is not None:
                grad_h = grad_h + grad_kl.float()[:, None] * (expected - expected_ref)
            grad_h = grad_h.to(h.dtype)
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_weight, grad_bias = _head_grads(ctx, h, weight, bias, tok, grad_at, grad_kl)
        return (grad_h, grad_weight, grad_bias, None, None, None, None, None, None)


def _expected(p: Tensor, slope: Tensor, w: Tensor, head: Head) -> Tensor:
    """E_p[f' W] (rows, H): without a soft-cap f' is the constant scale, and no tile is made."""
    if head.softcap is None:
        return (p @ w) * (head.scale or 1.0)
    return (p * slope) @ w


def _head_grads(ctx, h, weight, bias, tok, grad_at, grad_kl):
    """The head's gradient, tile by tile: d/dz = sum_j g_j (onehot_j - p) + g_kl (p - p_ref),
    times f', then z's Jacobian in W and b."""
    spec, tiles = ctx.spec, ctx.tile_rows
    ref_h, ref_weight, ref_bias = ctx.saved_tensors[4:7]
    head = Head(weight, bias, spec[0], spec[1])
    grad_weight = torch.zeros_like(weight, dtype=torch.float32)
    grad_bias = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
    n_rows = h.shape[0]
    # three tiles live, in reused buffers: A holds z, then z_ref; B holds p, then d/dz;
    # C holds p_ref, then the KL term
    a, b, c = _tile_buffers(3, min(tiles, n_rows), weight.shape[0], h)
    for start in range(0, n_rows, tiles):
        rows = slice(start, start + tiles)
        n = min(tiles, n_rows - start)
        z, slope = tile_logits(h[rows], head, a[:n])
        p = torch._softmax(z, -1, False, out=b[:n])
        kl_term = None
        if ctx.with_ref and grad_kl is not None:
            zr, _ = tile_logits(ref_h[rows], Head(ref_weight, ref_bias, spec[2], spec[3]), a[:n])
            kl_term = torch._softmax(zr, -1, False, out=c[:n])
            kl_term.neg_().add_(p).mul_(grad_kl.float()[rows, None])  # g_kl (p - p_ref)
        g = grad_at[rows]
        grad_z = p.mul_(-g.sum(-1, keepdim=True))  # in place: p is not read again
        grad_z.scatter_add_(-1, tok[rows], g)
        if kl_term is not None:
            grad_z += kl_term
        grad_z *= slope
        grad_weight.addmm_(grad_z.T, h[rows].float())  # no (V, H) temporary per tile
        if grad_bias is not None:
            grad_bias += grad_z.sum(0)
    return grad_weight.to(weight.dtype), None if bias is None else grad_bias.to(bias.dtype)


def _spec(head: Head, ref: Head | None) -> tuple:
    return (head.scale, head.softcap, ref.scale if ref else None, ref.softcap if ref else None)


def head_values(
    h: Tensor, head: Head, tokens: Tensor, ref_h: Tensor | None = None, ref: Head | None = None,
    *, tile_rows: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:  # fmt: skip
    """(log pi of `tokens` (N, k), KL(pi_ref || pi) (N,) or None, log pi_ref of `tokens` or None)
    for rows `h` (N, H); tokens < 0 (IGNORE_INDEX) read token 0 and are masked by the caller."""
    ref_args = (None, None, None) if ref_h is None else (ref_h, ref.weight, ref.bias)
    rows = tile_rows or rows_per_tile(head.weight.shape[0])
    return _HeadValues.apply(h, head.weight, head.bias, tokens, *ref_args, _spec(head, ref), rows)


@torch.no_grad()
def head_entropy(h: Tensor, head: Head, *, tile_rows: int | None = None, top_k: int = 0) -> Tensor:
    """Predictive entropy (N,) of each row's distribution (top-k renormalised when top_k > 0)."""
    tile_rows = tile_rows or rows_per_tile(head.weight.shape[0])
    out = h.new_zeros(h.shape[0], dtype=torch.float32)
    for start in range(0, h.shape[0], tile_rows):
        z, _ = tile_logits(h[start : start + tile_rows], head)
        if top_k:
            z = z.topk(top_k, dim=-1).values
        logp = z.log_softmax(-1)
        out[start : start + tile_rows] = -(logp.exp() * logp).sum(-1)
    return out


@torch.no_grad()
def head_sample(
    h: Tensor, head: Head, generator: torch.Generator, *, tile_rows: int | None = None
) -> tuple[Tensor, Tensor]:
    """One token a ~ softmax(z) per row by Gumbel-max, tile by tile, and log pi(a): (N,), (N,)."""
    tile_rows = tile_rows or rows_per_tile(head.weight.shape[0])
    tokens = torch.empty(h.shape[0], dtype=torch.long, device=h.device)
    logps = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], tile_rows):
        rows = slice(start, start + tile_rows)
        z, _ = tile_logits(h[rows], head)
        uniform = torch.rand(z.shape, generator=generator, device=z.device).clamp_min(1e-20)
        tokens[rows] = (z - torch.log(-torch.log(uniform))).argmax(-1)
        logps[rows] = z.log_softmax(-1).gather(-1, tokens[rows, None])[:, 0]
    return tokens, logps
