"""Preference losses as pure functions of per-token log-probabilities (the public loss contract).

Every loss takes one `TokenLogps` and keyword hyperparameters and returns `(losses, metrics)`:
`losses` is (B,) per pair, `metrics` a dict of detached (B,) tensors. Formulas: docs/method.md,
from "TokenRatio" (arXiv 2605.12288), DPO (2305.18290), BPO (2505.19601), TDPO (2404.11999),
TIS-DPO (2410.04350).

Notation: r_t(y) = log pi_theta(y_t|s_t) - log pi_ref(y_t|s_t), the per-token log-ratio;
u = sum_t r_t(y^chosen) - sum_t r_t(y^rejected), the sequence margin.

Sequence level: dpo, ipo, bpo (Bregman ratio matching on R = exp(-beta u)), tdpo1, tdpo2, sft,
                tisdpo (DPO with a per-token importance weight on every log-ratio).
Token level:    tbpo-q, tbpo-a (Bregman ratio matching on R_t, one per aligned position, TBPO eq. in
                docs/method.md §3.2-3.3).
Bregman generators (pure functions of log R) are in bregman.py; losses are in `LOSSES` at the bottom.
This module imports only torch.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from tokenratio.bregman import GENERATORS as GENERATORS  # re-exported: part of the public API
from tokenratio.bregman import bregman_generator

Tensor = torch.Tensor


@dataclass(frozen=True)
class TokenLogps:
    """Per-token inputs of every loss. All tensors are (B, T) and response-aligned.

    Column j of every chosen tensor and of every rejected tensor holds response token j; the prompt is
    not in these tensors. Values outside the masks are ignored (they may be anything, even nan).

    Fields:
        policy_chosen, policy_rejected: (B, T) float, log pi_theta of each response token.
        ref_chosen, ref_rejected: (B, T) float, log pi_ref of the same tokens.
        chosen_mask, rejected_mask: (B, T) bool, True on response tokens.
        chosen_kl, rejected_kl: (B, T) float or None, KL(pi_ref || pi_theta) at each response position
            (needed by tdpo1, tdpo2 and tbpo-a with kl_estimator="exact").
        chosen_baseline, rejected_baseline: (B, T) float or None, the state-baseline head's b(s_t)
            at the position whose logits predict token t (needed by tbpo-q).
        chosen_weight, rejected_weight: (B, T) float or None, TIS-DPO's per-token importance weight
            w_t >= 0 of each response token (needed by tisdpo; `tokenratio.tisdpo` estimates them
            from two contrastive models). Data, not model outputs: no gradient flows into them.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_mask: Tensor
    rejected_mask: Tensor
    chosen_kl: Tensor | None = None
    rejected_kl: Tensor | None = None
    chosen_baseline: Tensor | None = None
    rejected_baseline: Tensor | None = None
    chosen_weight: Tensor | None = None
    rejected_weight: Tensor | None = None

    def __post_init__(self):
        shape = self.policy_chosen.shape
        if len(shape) != 2:
            raise ValueError(f"TokenLogps tensors must be (B, T); policy_chosen is {tuple(shape)}")
        for item in fields(self):
            value = getattr(self, item.name)
            if value is not None and value.shape != shape:
                raise ValueError(
                    f"TokenLogps.{item.name} has shape {tuple(value.shape)}, expected {tuple(shape)} "
                    "(pad chosen and rejected to the same response length)"
                )
        for name in ("chosen_mask", "rejected_mask"):
            if getattr(self, name).dtype != torch.bool:
                raise ValueError(f"TokenLogps.{name} must be a bool tensor")


# ---------------------------------------------------------------------------------------------
# Small pure helpers


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """(B, T) -> (B,): sum over the mask; values outside it (even nan) contribute nothing."""
    return torch.where(mask, values, torch.zeros_like(values)).sum(-1)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """(B, T) -> (B,): mean over the mask (0 for an empty row)."""
    return masked_sum(values, mask) / mask.sum(-1).clamp_min(1)


def log_ratios(batch: TokenLogps) -> tuple[Tensor, Tensor]:
    """Per-token r_t = log pi_theta - log pi_ref for chosen and rejected, (B, T) each."""
    return batch.policy_chosen - batch.ref_chosen, batch.policy_rejected - batch.ref_rejected


def k3(log_ratio: Tensor) -> Tensor:
    """Schulman's k3 estimate of KL(pi_ref || pi_theta) from one token a ~ pi_ref.

    With rho = pi_theta(a)/pi_ref(a) = exp(log_ratio): k3 = (rho - 1) - log rho >= 0, unbiased.
    """
    return torch.expm1(log_ratio) - log_ratio


def reduce(losses: Tensor, num_pairs: int | None = None, weights: Tensor | None = None) -> Tensor:
    """Mean of per-pair losses; with `num_pairs`, sum / num_pairs.

    Pass the number of pairs of the whole optimizer step (all micro-batches, all processes) so that
    gradient accumulation and data parallelism give the same gradient as one big batch.

    `weights` (B,): each pair's loss weight (data.pair_weight_field), the mean then weighted,
    sum(w * loss) / sum(w), so a pair of weight 0 is a pair dropped and one of weight 2 a pair
    counted twice (a batch whose weights are all 0 gives 0: nothing to learn from it).
    """
    if weights is not None:
        weights = weights.to(losses.dtype)
        total = weights.sum().clamp_min(1e-30) if num_pairs is None else num_pairs
        return (weights * losses).sum() / total
    if num_pairs is None:
        return losses.mean()
    return losses.sum() / num_pairs


def preference_accuracy(chosen_reward: Tensor, rejected_reward: Tensor) -> Tensor:
    """1 where the chosen response's implicit reward is higher, 0 where lower, 0.5 at a tie (a
    tie is a coin flip: the untrained policy, equal to the reference, scores 0.5, not 0). The
    one definition the trainer, eval and the study use."""
    return (chosen_reward > rejected_reward).float() + 0.5 * (chosen_reward == rejected_reward)


def _sequence_metrics(batch: TokenLogps, beta: float) -> dict[str, Tensor]:
    """Implicit rewards beta * sum_t r_t (DPO's), their margin and the preference accuracy."""
    chosen_ratio, rejected_ratio = log_ratios(batch)
    chosen = beta * masked_sum(chosen_ratio, batch.chosen_mask).detach()
    rejected = beta * masked_sum(rejected_ratio, batch.rejected_mask).detach()
    return {
        "reward_chosen": chosen,
        "reward_rejected": rejected,
        "reward_margin": chosen - rejected,
        "reward_accuracy": preference_accuracy(chosen, rejected),
    }


def _require(batch: TokenLogps, names: tuple[str, ...], loss: str, why: str) -> None:
    missing = [n for n in names if getattr(batch, n) is None]
    if missing:
        raise ValueError(f"loss '{loss}' needs TokenLogps.{' and '.join(missing)} ({why})")


def sequence_margin(batch: TokenLogps) -> Tensor:
    """(B,): u = sum_t r_t(y^chosen) - sum_t r_t(y^rejected), the sequence log-ratio margin."""
    chosen_ratio, rejected_ratio = log_ratios(batch)
    return masked_sum(chosen_ratio, batch.chosen_mask) - masked_sum(
        rejected_ratio, batch.rejected_mask
    )


def _ratio_matching(logit: Tensor, generator: str, lam, s, clamp) -> tuple[Tensor, Tensor]:
    """Bregman ratio matching on a Bradley-Terry logit z: l(R) with log R = -z clamped
    (docs/method.md §2); returns the per-pair losses and which hit the clamp."""
    log_r, at_clamp = _clamp_log_r(-logit, clamp)
    return bregman_generator(generator, lam, s)(log_r), at_clamp


def _clamp_log_r(log_r: Tensor, clamp: float | None) -> tuple[Tensor, Tensor]:
    """Clamp log R to [-clamp, clamp] (authors: 30) and report which entries hit the bound."""
    if clamp is None:
        return log_r, torch.zeros_like(log_r, dtype=torch.bool)
    return log_r.clamp(-clamp, clamp), log_r.detach().abs() >= clamp


# ---------------------------------------------------------------------------------------------
# Sequence-level losses


def dpo_loss(batch: TokenLogps, *, beta: float, label_smoothing: float = 0.0):
    """DPO: -log sigma(beta u), with conservative label smoothing eps: (1-eps) l(u) + eps l(-u).

    Hand value: u = 1, beta = 1, eps = 0 gives log(1 + e^-1) = 0.31326.
    """
    u = sequence_margin(batch)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * u) - label_smoothing * F.logsigmoid(
        -beta * u
    )
    return losses, _sequence_metrics(batch, beta)


def ipo_loss(batch: TokenLogps, *, beta: float):
    """IPO: (u - 1/(2 beta))^2, with u the margin of per-token averaged log-ratios (TRL's convention)."""
    chosen_ratio, rejected_ratio = log_ratios(batch)
    u = masked_mean(chosen_ratio, batch.chosen_mask) - masked_mean(
        rejected_ratio, batch.rejected_mask
    )
    return (u - 1 / (2 * beta)) ** 2, _sequence_metrics(batch, beta)


def bpo_loss(
    batch: TokenLogps,
    *,
    beta: float,
    generator: str = "sba",
    lam: float | None = None,
    s: float | None = None,
    clamp: float | None = 30.0,
):
    """BPO, Bregman ratio matching at sequence level: l(R) with log R = -beta u (clamped).

    Generator `lr` gives exactly DPO. Default SBA(lam=0, s=4), the paper's BPO-SBA baseline.
    """
    losses, at_clamp = _ratio_matching(beta * sequence_margin(batch), generator, lam, s, clamp)
    metrics = _sequence_metrics(batch, beta)
    metrics["clamp_fraction"] = at_clamp.float()
    return losses, metrics


def _sequence_kl(batch: TokenLogps, loss: str) -> tuple[Tensor, Tensor]:
    _require(batch, ("chosen_kl", "rejected_kl"), loss, "TDPO's sequential KL")
    return (
        masked_sum(batch.chosen_kl, batch.chosen_mask),
        masked_sum(batch.rejected_kl, batch.rejected_mask),
    )


def _tdpo_logit(batch: TokenLogps, beta: float, kl_term: Tensor) -> Tensor:
    """z = beta (u - kl_term), (B,): the logit of TDPO's Bradley-Terry model."""
    return beta * (sequence_margin(batch) - kl_term)


def _tdpo(batch: TokenLogps, beta: float, kl_term: Tensor, chosen_kl: Tensor):
    losses = -F.logsigmoid(_tdpo_logit(batch, beta, kl_term))
    metrics = _sequence_metrics(batch, beta)
    metrics["seq_kl_chosen"] = chosen_kl.detach()
    return losses, metrics


def tdpo1_loss(
    batch: TokenLogps,
    *,
    beta: float,
    generator: str = "lr",
    lam: float | None = None,
    s: float | None = None,
    clamp: float | None = None,
):
    """TDPO1 as Bregman ratio matching: l(R) with log R = -z, z = beta u - beta (SeqKL(y^l) -
    SeqKL(y^w)), SeqKL over the full vocabulary (docs/method.md §2 and §6).

    `generator="lr"` (default) is TDPO1: l(R) = log(1 + R) = -log sigma(z), unclamped as the
    official TDPO loss is (softplus is stable at any z: z = -97.3 gives 97.3 and a gradient). Every
    strictly convex generator has the same population minimiser under sequence-level
    Bradley-Terry labels: the token-level optimum pi*_tok (docs/method.md §6). `clamp` bounds log R
    as in `bpo`; unset, the other generators, whose l(R) grows like R = e^{-z} and overflows
    float32 beyond log R = 88, take the authors' bound, 30.
    Hand value: u = 1, SeqKL(y^w) = 0.3, SeqKL(y^l) = 0.5, beta = 1: z = 0.8, lr: log(1 + e^-0.8).
    """
    chosen_kl, rejected_kl = _sequence_kl(batch, "tdpo1")
    z = _tdpo_logit(batch, beta, rejected_kl - chosen_kl)
    if clamp is None and generator != "lr":
        clamp = 30.0
    losses, at_clamp = _ratio_matching(z, generator, lam, s, clamp)
    metrics = _sequence_metrics(batch, beta)
    metrics["seq_kl_chosen"] = chosen_kl.detach()
    metrics["clamp_fraction"] = at_clamp.float()
    return losses, metrics


def tdpo2_loss(batch: TokenLogps, *, beta: float, alpha: float = 0.5):
    """TDPO2: -log sigma(beta u - alpha beta (SeqKL(y^l) - stopgrad SeqKL(y^w))), alpha = 0.5."""
    chosen_kl, rejected_kl = _sequence_kl(batch, "tdpo2")
    return _tdpo(batch, beta, alpha * (rejected_kl - chosen_kl.detach()), chosen_kl)


def sft_loss(batch: TokenLogps, *, beta: float = 0.0):
    """SFT: mean negative log-likelihood of the chosen response tokens (beta is ignored).

    Used to build a reference from a base model, as the paper's SFT baseline does.
    """
    losses = -masked_mean(batch.policy_chosen, batch.chosen_mask)
    return losses, {"nll_chosen": losses.detach()}


def tisdpo_loss(batch: TokenLogps, *, beta: float, kl_coef: float = 0.0):
    """TIS-DPO (Liu et al., arXiv 2410.04350): DPO with an importance weight on every token's log-ratio.

        u_w = sum_t w^w_t r_t(y^w) - sum_t w^l_t r_t(y^l)
        loss = -log sigma(beta u_w - kl_coef beta (sum_t w^w_t KL_t(y^w) - sum_t w^l_t KL_t(y^l)))

    The weights come from `chosen_weight`/`rejected_weight` (`tokenratio.tisdpo.importance_weights`).
    kl_coef = 0 (default) is the weighted DPO objective, which is also the authors' code with
    `token_level=False`; kl_coef > 0 adds their `token_level=True` term, a weighted sequential KL with
    coefficient `alpha` and that sign. Their code takes KL(pi_theta || pi_ref) there; this loss reads
    the contract's KL fields, which hold KL(pi_ref || pi_theta) (TDPO's SeqKL direction).
    With w = 1 and kl_coef = 0 this is exactly DPO. Hand value: r(y^w) = [0.5, 0.5], r(y^l) = 0,
    w^w = [2, 0], beta = 1: u_w = 1, loss = log(1 + e^-1).
    """
    _require(
        batch,
        ("chosen_weight", "rejected_weight"),
        "tisdpo",
        "per-token importance weights: score the data with `tokenratio tisdpo`",
    )
    chosen_ratio, rejected_ratio = log_ratios(batch)
    chosen_w, rejected_w = batch.chosen_weight.detach(), batch.rejected_weight.detach()
    u_w = masked_sum(chosen_w * chosen_ratio, batch.chosen_mask) - masked_sum(
        rejected_w * rejected_ratio, batch.rejected_mask
    )  # (B,)
    logits = beta * u_w
    if kl_coef:
        _require(batch, ("chosen_kl", "rejected_kl"), "tisdpo", "its weighted KL term (kl_coef)")
        chosen_kl = masked_sum(chosen_w * batch.chosen_kl, batch.chosen_mask)
        rejected_kl = masked_sum(rejected_w * batch.rejected_kl, batch.rejected_mask)
        logits = logits - kl_coef * beta * (chosen_kl - rejected_kl)
    metrics = _sequence_metrics(batch, beta)
    metrics["weighted_margin"] = logits.detach()
    metrics["weighted_accuracy"] = preference_accuracy(logits.detach(), torch.zeros_like(logits))
    metrics["mean_weight_chosen"] = masked_mean(chosen_w, batch.chosen_mask)
    return -F.logsigmoid(logits), metrics


def importance_weights(
    contrast: torch.Tensor,
    *,
    chosen: bool,
    lower: float = -1.0,
    upper: float = 1.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """TIS-DPO weights w = scale * exp(mu * clamp(contrast, lower, upper)), mu = +1 (chosen) or -1.

    Args:
        contrast: any shape, log pi+(y_t|s_t) - log pi-(y_t|s_t) of each response token.
        chosen: whether these tokens are from the chosen response.

    Returns:
        Weights of the same shape, in [scale e^lower, scale e^upper] (chosen) or
        [scale e^-upper, scale e^-lower] (rejected).
    """
    if lower > upper:
        raise ValueError(f"TIS-DPO weight bounds: lower ({lower}) must not exceed upper ({upper})")
    if scale <= 0:
        raise ValueError(f"TIS-DPO weight scale must be > 0, got {scale}")
    mu = 1.0 if chosen else -1.0
    return scale * torch.exp(mu * contrast.clamp(lower, upper))


# ---------------------------------------------------------------------------------------------
# Token-level losses (TBPO)


def _tbpo(
    batch: TokenLogps,
    log_w: Tensor,
    valid: Tensor,
    *,
    beta: float,
    generator: str,
    lam: float | None,
    s: float | None,
    clamp: float | None,
):
    """Mean over aligned positions t <= min(|y^w|, |y^l|) of l(R_t), docs/method.md §3.3.

    log R_t = beta * (r_t(y^l) - r_t(y^w) + log w_t)   (point 2).
    """
    loss_of_log_r = bregman_generator(generator, lam, s)
    chosen_ratio, rejected_ratio = log_ratios(batch)
    log_r = beta * (rejected_ratio - chosen_ratio + log_w)  # (B, T)
    log_r = torch.where(valid, log_r, torch.zeros_like(log_r))  # keep padding finite
    log_r, at_clamp = _clamp_log_r(log_r, clamp)
    losses = masked_mean(loss_of_log_r(log_r), valid)  # (B,)
    metrics = _sequence_metrics(batch, beta)
    metrics["token_accuracy"] = masked_mean((log_r < 0).float(), valid).detach()
    metrics["log_w"] = masked_mean(log_w, valid).detach()
    metrics["clamp_fraction"] = masked_mean(at_clamp.float(), valid)
    return losses, metrics


def aligned_mask(batch: TokenLogps) -> Tensor:
    """(B, T) bool: positions present in both responses, t = 1..min(|y^w|, |y^l|)."""
    return batch.chosen_mask & batch.rejected_mask


def tbpo_q_loss(
    batch: TokenLogps,
    *,
    beta: float,
    generator: str = "sba",
    lam: float | None = None,
    s: float | None = None,
    clamp: float | None = 30.0,
    center_log_w: bool = True,
    log_w_clamp: float | None = 10.0,
):
    """TBPO-Q: log w_t = b(s^l_t) - b(s^w_t), b the learned state-baseline head (docs/method.md §3.2).

    The authors' code (not the paper) centres log w over each pair's aligned positions and clamps it
    to [-10, 10]; both are on by default (`center_log_w`, `log_w_clamp`; None turns the clamp off).
    Gradient reaches the head through log w and the policy through r_t.
    """
    _require(batch, ("chosen_baseline", "rejected_baseline"), "tbpo-q", "the baseline head output")
    valid = aligned_mask(batch)
    log_w = batch.rejected_baseline - batch.chosen_baseline  # (B, T)
    log_w = torch.where(valid, log_w, torch.zeros_like(log_w))
    if center_log_w:
        log_w = log_w - masked_mean(log_w, valid)[:, None]
    if log_w_clamp is not None:
        log_w = log_w.clamp(-log_w_clamp, log_w_clamp)
    return _tbpo(batch, log_w, valid, beta=beta, generator=generator, lam=lam, s=s, clamp=clamp)


KL_ESTIMATORS = ("exact", "k3", "k3-response")


def tbpo_a_loss(
    batch: TokenLogps,
    *,
    beta: float,
    generator: str = "sba",
    lam: float | None = None,
    s: float | None = None,
    clamp: float | None = 30.0,
    kl_estimator: str = "exact",
    detach_kl: bool = False,
):
    """TBPO-A: log w_t = KL(pi_ref||pi_theta)(s^l_t) - KL(pi_ref||pi_theta)(s^w_t) (docs/method.md §3.2).

    The KL per position comes from `chosen_kl`/`rejected_kl`, filled by the forward pass according
    to `kl_estimator`: "exact" (default, the authors' code) the full-vocabulary KL; "k3" (the
    paper's text) Schulman's k3 at one fresh token a ~ pi_ref per position (`sampled_k3`).
    "k3-response" computes k3 here at the response token itself: no extra work, but biased, since
    the winner's tokens are selected by the label rather than drawn from pi_ref (the population
    benchmark shows it missing pi*_tok). `detach_kl=True` stops gradient through the correction
    (the authors let it flow).
    """
    if kl_estimator in ("exact", "k3"):
        _require(batch, ("chosen_kl", "rejected_kl"), "tbpo-a", f'kl_estimator="{kl_estimator}"')
        chosen_kl, rejected_kl = batch.chosen_kl, batch.rejected_kl
    elif kl_estimator == "k3-response":
        chosen_ratio, rejected_ratio = log_ratios(batch)
        chosen_kl, rejected_kl = k3(chosen_ratio), k3(rejected_ratio)
    else:
        raise ValueError(f"unknown kl_estimator '{kl_estimator}'; valid: {list(KL_ESTIMATORS)}")
    log_w = rejected_kl - chosen_kl  # (B, T)
    if detach_kl:
        log_w = log_w.detach()
    valid = aligned_mask(batch)
    log_w = torch.where(valid, log_w, torch.zeros_like(log_w))
    return _tbpo(batch, log_w, valid, beta=beta, generator=generator, lam=lam, s=s, clamp=clamp)


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class Needs:
    """What a loss's forward pass must provide beyond the policy's log-probs of the labels.

    Fields:
        reference: log pi_ref of the labels (False: no reference model is loaded or run).
        kl: what the KL fields hold: "exact" (full-vocabulary KL(pi_ref || pi_theta) per position),
            "k3" (one-sample estimate at a ~ pi_ref) or None (not read).
        baseline: the TBPO-Q head's b(s_t).
        weights: per-token importance weights carried by the data (TIS-DPO).
    """

    reference: bool = True
    kl: str | None = None
    baseline: bool = False
    weights: bool = False


def _no_kl(options: dict) -> None:
    return None


def _exact_kl(options: dict) -> str:
    return "exact"


def _tisdpo_kl(options: dict) -> str | None:
    return "exact" if options.get("kl_coef", 0.0) else None


def _tbpo_a_kl(options: dict) -> str | None:
    estimator = options.get("kl_estimator", "exact")
    return estimator if estimator in ("exact", "k3") else None  # k3-response: computed in-loss


@dataclass(frozen=True)
class Loss:
    """A registry entry: the loss function and what its forward pass needs.

    Calling the entry calls the function: `LOSSES["dpo"](batch, beta=0.1)`. Unknown options raise
    ValueError naming the loss and its real options before any tensor is touched.
    """

    name: str
    fn: Callable[..., tuple[Tensor, dict[str, Tensor]]]
    reference: bool = True
    baseline: bool = False
    weights: bool = False
    kl: Callable[[dict], str | None] = field(default=_no_kl)

    @property
    def options(self) -> list[str]:
        """Keyword options of the loss (beta excluded: every loss takes it)."""
        params = inspect.signature(self.fn).parameters.values()
        return [p.name for p in params if p.kind == p.KEYWORD_ONLY and p.name != "beta"]

    def check_options(self, options: dict) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for loss '{self.name}'; "
                f"valid options: {self.options or 'none'}"
            )

    def needs(self, options: dict | None = None) -> Needs:
        options = dict(options or {})
        self.check_options(options)
        return Needs(self.reference, self.kl(options), self.baseline, self.weights)

    def __call__(self, batch: TokenLogps, **options):
        self.check_options({k: v for k, v in options.items() if k != "beta"})
        return self.fn(batch, **options)


class _LossRegistry(dict):
    """A plain dict whose unknown keys raise ValueError listing the valid names."""

    def __missing__(self, name):
        raise ValueError(f"unknown loss '{name}'; valid losses: {sorted(self)}")


LOSSES: dict[str, Loss] = _LossRegistry(
    {
        "dpo": Loss("dpo", dpo_loss),
        "ipo": Loss("ipo", ipo_loss),
        "bpo": Loss("bpo", bpo_loss),
        "tdpo1": Loss("tdpo1", tdpo1_loss, kl=_exact_kl),
        "tdpo2": Loss("tdpo2", tdpo2_loss, kl=_exact_kl),
        "tbpo-q": Loss("tbpo-q", tbpo_q_loss, baseline=True),
        "tbpo-a": Loss("tbpo-a", tbpo_a_loss, kl=_tbpo_a_kl),
        "sft": Loss("sft", sft_loss, reference=False),
        "tisdpo": Loss("tisdpo", tisdpo_loss, weights=True, kl=_tisdpo_kl),
    }
)
