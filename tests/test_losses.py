"""The loss library against hand-derived values, a naive implementation, gradcheck and properties."""

import math
from dataclasses import fields, replace

import pytest
import torch
from torch.testing import assert_close

from naive_losses import naive_loss
from tokenratio.losses import GENERATORS, LOSSES, Needs, TokenLogps, k3, reduce
from tokenratio.tisdpo import importance_weights

FIELDS = [f.name for f in fields(TokenLogps)]


def mapped(batch, fn):
    """The batch with `fn` applied to every tensor it holds."""
    return TokenLogps(**{f: fn(getattr(batch, f)) for f in FIELDS if getattr(batch, f) is not None})


ALL = sorted(LOSSES)
PREFERENCE = [n for n in ALL if n != "sft"]


def make_batch(pc, pr, rc, rr, lc=None, lr=None, dtype=torch.float64, **extra):
    """TokenLogps of one pair from per-token lists (lengths default to the list lengths)."""
    T = max(len(pc), len(pr))

    def pad(values):
        return torch.tensor([list(values) + [0.0] * (T - len(values))], dtype=dtype)

    lc = len(pc) if lc is None else lc
    lr = len(pr) if lr is None else lr
    mask = lambda n: (torch.arange(T) < n)[None]  # noqa: E731
    kw = {k: pad(v) for k, v in extra.items()}
    return TokenLogps(pad(pc), pad(pr), pad(rc), pad(rr), mask(lc), mask(lr), **kw)


# The reference pair used by most hand derivations:
#   r(chosen) = [-1 - -1.5, -2 - -2.5] = [0.5, 0.5], sum 1;  r(rejected) = [0, 0];  u = 1.
PAIR = dict(pc=[-1.0, -2.0], pr=[-1.0, -1.0], rc=[-1.5, -2.5], rr=[-1.0, -1.0])


def test_dpo_hand_value():
    """u = 1, beta = 1: -log sigma(1) = log(1 + e^-1)."""
    losses, _ = LOSSES["dpo"](make_batch(**PAIR), beta=1.0)
    assert_close(losses, torch.tensor([math.log1p(math.exp(-1))], dtype=torch.float64))


def test_dpo_label_smoothing_hand_value():
    """eps = 0.1, beta u = 0.5: 0.9 log(1 + e^-0.5) + 0.1 log(1 + e^0.5)."""
    losses, _ = LOSSES["dpo"](make_batch(**PAIR), beta=0.5, label_smoothing=0.1)
    expected = 0.9 * math.log1p(math.exp(-0.5)) + 0.1 * math.log1p(math.exp(0.5))
    assert_close(losses.item(), expected)


def test_ipo_hand_value():
    """Per-token means: 0.5 - 0 = 0.5; beta = 0.5 so 1/(2 beta) = 1; (0.5 - 1)^2 = 0.25."""
    losses, _ = LOSSES["ipo"](make_batch(**PAIR), beta=0.5)
    assert_close(losses.item(), 0.25)


@pytest.mark.parametrize(
    "generator, options, expected",
    [
        # log R = -beta u = -1, R = e^-1.
        ("lr", {}, math.log1p(math.exp(-1))),
        ("kliep", {}, math.exp(-1) - 1),  # R + log R
        ("lsif", {}, math.exp(-2) - 2 * math.e),  # R^2 - 2/R
        ("ba", {"lam": 1.0}, math.exp(-2) - 2 * math.e),  # R^2 - 2 R^-1 == LSIF at lam = 1
        ("ba", {"lam": 0.5}, math.exp(-1.5) - 3 * math.exp(0.5)),  # R^1.5 - 3 R^-0.5
        ("ba", {"lam": 0.0}, math.exp(-1) - 1),  # finite limit == KLIEP
        ("sba", {}, (math.exp(-1) - 1) / 4),  # lam = 0, s = 4: (R + log R)/4
        ("sba", {"lam": 1.0, "s": 2.0}, math.exp(-2) / 4 - math.e / 2),  # R^2/(2*2) - R^-1/2
    ],
)
def test_bpo_generators_hand_values(generator, options, expected):
    losses, _ = LOSSES["bpo"](make_batch(**PAIR), beta=1.0, generator=generator, **options)
    assert_close(losses.item(), expected)


def test_bpo_clamps_log_ratio():
    """u = 100, beta = 1: log R = -100 is clamped to -30, so KLIEP gives e^-30 - 30."""
    batch = make_batch(pc=[0.0], pr=[0.0], rc=[-100.0], rr=[0.0])
    losses, metrics = LOSSES["bpo"](batch, beta=1.0, generator="kliep")
    assert_close(losses.item(), math.exp(-30) - 30)
    assert metrics["clamp_fraction"].item() == 1.0
    unclamped, _ = LOSSES["bpo"](batch, beta=1.0, generator="kliep", clamp=None)
    assert_close(unclamped.item(), math.exp(-100) - 100)


KL = dict(chosen_kl=[0.1, 0.2], rejected_kl=[0.5, 0.0])  # SeqKL: chosen 0.3, rejected 0.5


def test_tdpo_hand_values():
    """TDPO1: -log sigma(1 - (0.5 - 0.3)) = log(1 + e^-0.8); TDPO2 (alpha 0.5): log(1 + e^-0.9)."""
    batch = make_batch(**PAIR, **KL)
    assert_close(LOSSES["tdpo1"](batch, beta=1.0)[0].item(), math.log1p(math.exp(-0.8)))
    # The Bregman form: log R = -z = -0.8; SBA(0, 4): (R + log R)/4; KLIEP: R + log R.
    sba = LOSSES["tdpo1"](batch, beta=1.0, generator="sba")[0].item()
    assert_close(sba, (math.exp(-0.8) - 0.8) / 4)
    assert_close(
        LOSSES["tdpo1"](batch, beta=1.0, generator="kliep")[0].item(), math.exp(-0.8) - 0.8
    )
    assert_close(LOSSES["tdpo2"](batch, beta=1.0)[0].item(), math.log1p(math.exp(-0.9)))


def test_tbpo_a_exact_hand_values():
    """log w = KL_rej - KL_chosen = [0.4, -0.2]; log R_t = beta (r_rej - r_chosen + log w)
    = [0 - 0.5 + 0.4, 0 - 0.5 - 0.2] = [-0.1, -0.7] at beta = 1.
    LR: mean(log(1 + e^-0.1), log(1 + e^-0.7)).  SBA(0, 4): mean((e^-0.1 - 0.1)/4, (e^-0.7 - 0.7)/4).
    """
    batch = make_batch(**PAIR, **KL)
    lr = (math.log1p(math.exp(-0.1)) + math.log1p(math.exp(-0.7))) / 2
    sba = ((math.exp(-0.1) - 0.1) + (math.exp(-0.7) - 0.7)) / 8
    assert_close(LOSSES["tbpo-a"](batch, beta=1.0, generator="lr")[0].item(), lr)
    assert_close(LOSSES["tbpo-a"](batch, beta=1.0)[0].item(), sba)


def test_tbpo_a_k3_response_hand_value():
    """k3 at the response tokens: k3(0.5) = e^0.5 - 1.5 for chosen, k3(0) = 0 for rejected, so
    log w_t = -(e^0.5 - 1.5) and log R_t = -0.5 - (e^0.5 - 1.5) = 1 - e^0.5 at both positions.
    """
    batch = make_batch(**PAIR)
    log_r = 1 - math.exp(0.5)
    losses, _ = LOSSES["tbpo-a"](batch, beta=1.0, generator="lr", kl_estimator="k3-response")
    assert_close(losses.item(), math.log1p(math.exp(log_r)))


BASE = dict(chosen_baseline=[1.0, 2.0], rejected_baseline=[3.0, 1.0])  # raw log w = [2, -1]


@pytest.mark.parametrize(
    "options, log_w",
    [
        ({}, [1.5, -1.5]),  # centred (mean 0.5 removed), inside the [-10, 10] clamp
        ({"center_log_w": False}, [2.0, -1.0]),
        ({"log_w_clamp": 1.0}, [1.0, -1.0]),  # centred then clamped to [-1, 1]
    ],
)
def test_tbpo_q_hand_values(options, log_w):
    """log R_t = (0 - 0.5) + log w_t at beta = 1; LR per token log(1 + e^{log R_t}), then mean."""
    batch = make_batch(**PAIR, **BASE)
    expected = sum(math.log1p(math.exp(-0.5 + w)) for w in log_w) / 2
    losses, _ = LOSSES["tbpo-q"](batch, beta=1.0, generator="lr", **options)
    assert_close(losses.item(), expected)


def test_tbpo_uses_only_aligned_positions():
    """Chosen has 3 tokens, rejected 2: only t = 1, 2 enter (T = min = 2)."""
    batch = make_batch(
        pc=[-1.0, -2.0, -9.0],
        pr=[-1.0, -1.0],
        rc=[-1.5, -2.5, -1.0],
        rr=[-1.0, -1.0],
        chosen_kl=[0.1, 0.2, 5.0],
        rejected_kl=[0.5, 0.0, 0.0],
    )
    lr = (math.log1p(math.exp(-0.1)) + math.log1p(math.exp(-0.7))) / 2
    assert_close(LOSSES["tbpo-a"](batch, beta=1.0, generator="lr")[0].item(), lr)


def test_tisdpo_hand_values():
    """r(chosen) = [0.5, 0.5], r(rejected) = [0, 0], beta = 1.
    Weights [2, 0] on chosen: u_w = 2 * 0.5 + 0 * 0.5 = 1, loss log(1 + e^-1).
    Unit weights and kl_coef 0.5 with SeqKL chosen 0.3, rejected 0.5:
    logits = 1 - 0.5 (0.3 - 0.5) = 1.1, loss log(1 + e^-1.1).
    """
    weighted = make_batch(**PAIR, chosen_weight=[2.0, 0.0], rejected_weight=[5.0, 5.0])
    assert_close(LOSSES["tisdpo"](weighted, beta=1.0)[0].item(), math.log1p(math.exp(-1)))
    unit = make_batch(**PAIR, **KL, chosen_weight=[1.0, 1.0], rejected_weight=[1.0, 1.0])
    losses, metrics = LOSSES["tisdpo"](unit, beta=1.0, kl_coef=0.5)
    assert_close(losses.item(), math.log1p(math.exp(-1.1)))
    assert_close(metrics["weighted_margin"].item(), 1.1)


@pytest.mark.parametrize(
    "chosen, expected",
    [
        (True, [math.exp(-1), 1.0, math.exp(0.5), math.e]),  # exp(+clamp(c, -1, 1))
        (False, [math.e, 1.0, math.exp(-0.5), math.exp(-1)]),  # exp(-clamp(c, -1, 1))
    ],
)
def test_importance_weights_hand_values(chosen, expected):
    """Contrasts [-2, 0, 0.5, 3] clamp to [-1, 0, 0.5, 1]; scale 2 doubles every weight."""
    contrast = torch.tensor([-2.0, 0.0, 0.5, 3.0], dtype=torch.float64)
    weights = importance_weights(contrast, chosen=chosen, lower=-1.0, upper=1.0)
    assert_close(weights, torch.tensor(expected, dtype=torch.float64))
    scaled = importance_weights(contrast, chosen=chosen, lower=-1.0, upper=1.0, scale=2.0)
    assert_close(scaled, 2 * weights)
    with pytest.raises(ValueError, match="lower"):
        importance_weights(contrast, chosen=chosen, lower=1.0, upper=-1.0)
    with pytest.raises(ValueError, match="scale"):
        importance_weights(contrast, chosen=chosen, scale=0.0)


def test_sft_hand_value():
    """Mean NLL of chosen tokens: -(-1 - 2)/2 = 1.5."""
    assert_close(LOSSES["sft"](make_batch(**PAIR), beta=0.1)[0].item(), 1.5)


# ---------------------------------------------------------------------------------------------
# Random batches and the naive implementation

OPTION_GRID = {
    "dpo": [{}, {"label_smoothing": 0.2}],
    "ipo": [{}],
    "bpo": [{"generator": g} for g in GENERATORS] + [{"generator": "sba", "lam": 0.5, "s": 2.0}],
    "tdpo1": [{}, {"generator": "sba"}, {"generator": "kliep"}, {"generator": "lsif"}],
    "tdpo2": [{}, {"alpha": 0.3}],
    "tbpo-q": [{}, {"center_log_w": False, "log_w_clamp": None}, {"generator": "lr"}],
    "tbpo-a": [
        {},
        {"kl_estimator": "k3"},
        {"kl_estimator": "k3-response"},
        {"generator": "lsif"},
        {"generator": "ba", "lam": 0.5},
    ],
    "sft": [{}],
    "tisdpo": [{}, {"kl_coef": 0.5}],
}
CASES = [(name, options) for name in ALL for options in OPTION_GRID[name]]


def random_batch(B=5, T=7, dtype=torch.float64, seed=0, garbage=0.0):
    """Random pairs with lengths 1..T, left-aligned; values outside the masks set to `garbage`."""
    g = torch.Generator().manual_seed(seed)
    len_c = torch.randint(1, T + 1, (B,), generator=g)
    len_r = torch.randint(1, T + 1, (B,), generator=g)
    cols = torch.arange(T)[None]
    chosen_mask, rejected_mask = cols < len_c[:, None], cols < len_r[:, None]

    def draw(scale, shift=0.0, mask=None):
        x = (torch.randn(B, T, generator=g) * scale + shift).to(dtype)
        return x if mask is None else torch.where(mask, x, torch.full_like(x, garbage))

    pc, rc = draw(1.0, -2.0, chosen_mask), draw(1.0, -2.0, chosen_mask)
    pr, rr = draw(1.0, -2.0, rejected_mask), draw(1.0, -2.0, rejected_mask)
    return TokenLogps(
        pc,
        pr,
        rc,
        rr,
        chosen_mask,
        rejected_mask,
        chosen_kl=draw(0.3, 0.0, chosen_mask).abs(),
        rejected_kl=draw(0.3, 0.0, rejected_mask).abs(),
        chosen_baseline=draw(1.0, 0.0, chosen_mask),
        rejected_baseline=draw(1.0, 0.0, rejected_mask),
        chosen_weight=draw(0.7, 0.0, chosen_mask).abs(),
        rejected_weight=draw(0.7, 0.0, rejected_mask).abs(),
    )


def as_pairs(batch):
    pairs = []
    for i in range(batch.policy_chosen.shape[0]):
        pair = {
            "len_chosen": int(batch.chosen_mask[i].sum()),
            "len_rejected": int(batch.rejected_mask[i].sum()),
        }
        for name in (
            "policy_chosen",
            "policy_rejected",
            "ref_chosen",
            "ref_rejected",
            "chosen_kl",
            "rejected_kl",
            "chosen_baseline",
            "rejected_baseline",
            "chosen_weight",
            "rejected_weight",
        ):
            pair[name] = getattr(batch, name)[i].tolist()
        pairs.append(pair)
    return pairs


@pytest.mark.parametrize("name, options", CASES)
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_matches_naive_implementation(name, options, beta):
    batch = random_batch(seed=hash((name, beta)) % 1000)
    losses, _ = LOSSES[name](batch, beta=beta, **options)
    expected = [naive_loss(name, pair, beta, **options) for pair in as_pairs(batch)]
    assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-9)


# Inputs a loss deliberately stops gradient through (TDPO2: stopgrad SeqKL(y^w)).
STOP_GRADIENT = {"tdpo2": {"chosen_kl"}}
DIFFERENTIABLE = (
    "policy_chosen",
    "policy_rejected",
    "chosen_kl",
    "rejected_kl",
    "chosen_baseline",
    "rejected_baseline",
)


@pytest.mark.parametrize("name, options", CASES)
def test_gradcheck_float64(name, options):
    batch = random_batch(B=2, T=3, seed=1)
    names = [k for k in DIFFERENTIABLE if k not in STOP_GRADIENT.get(name, ())]
    inputs = {k: getattr(batch, k).clone().requires_grad_() for k in names}
    constants = {k: getattr(batch, k) for k in DIFFERENTIABLE if k not in names}
    constants.update(chosen_weight=batch.chosen_weight, rejected_weight=batch.rejected_weight)

    def fn(*tensors):
        fields = dict(zip(inputs, tensors, strict=True))
        b = TokenLogps(
            ref_chosen=batch.ref_chosen,
            ref_rejected=batch.ref_rejected,
            chosen_mask=batch.chosen_mask,
            rejected_mask=batch.rejected_mask,
            **fields,
            **constants,
        )
        return LOSSES[name](b, beta=0.5, **options)[0]

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()))


@pytest.mark.parametrize(
    "name, options, field",
    [
        ("tdpo2", {}, "chosen_kl"),
        ("tbpo-a", {"detach_kl": True}, "chosen_kl"),
        ("tbpo-a", {"detach_kl": True}, "rejected_kl"),
    ],
)
def test_stop_gradient_inputs_get_exactly_zero_gradient(name, options, field):
    batch = random_batch(seed=2)
    value = getattr(batch, field).clone().requires_grad_()
    b = replace(batch, **{field: value})
    losses, _ = LOSSES[name](b, beta=0.5, **options)
    assert (
        not losses.sum().requires_grad
        or torch.autograd.grad(losses.sum(), value, allow_unused=True)[0] is None
    )


@pytest.mark.parametrize("name, options", CASES)
def test_padding_beyond_mask_changes_nothing(name, options):
    """nan beyond the masks, and extra all-padding columns, leave losses and gradients unchanged."""
    clean = random_batch(seed=3)
    dirty = random_batch(seed=3, garbage=float("nan"))
    wide = mapped(
        clean,
        lambda v: torch.cat([v, torch.full_like(v[:, :4], v.dtype != torch.bool and 123.0)], 1),
    )
    reference = LOSSES[name](clean, beta=0.3, **options)[0]
    for other in (dirty, wide):
        assert_close(LOSSES[name](other, beta=0.3, **options)[0], reference)


def swapped(batch):
    return TokenLogps(
        batch.policy_rejected,
        batch.policy_chosen,
        batch.ref_rejected,
        batch.ref_chosen,
        batch.rejected_mask,
        batch.chosen_mask,
        batch.rejected_kl,
        batch.chosen_kl,
        batch.rejected_baseline,
        batch.chosen_baseline,
        batch.rejected_weight,
        batch.chosen_weight,
    )


@pytest.mark.parametrize("name, options", [c for c in CASES if c[0] != "sft"])
def test_swapping_chosen_and_rejected_raises_the_loss(name, options):
    """The policy already prefers chosen at every token (r = +0.4 vs -0.4), baselines and KLs
    equal: calling the rejected response the winner must cost more."""
    ones = torch.ones(3, 4, dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.bool)
    batch = TokenLogps(
        -ones + 0.4,
        -ones - 0.4,
        -ones,
        -ones,
        mask,
        mask,
        0.1 * ones,
        0.1 * ones,
        ones,
        ones,
        ones,
        ones,
    )
    right = LOSSES[name](batch, beta=0.5, **options)[0]
    wrong = LOSSES[name](swapped(batch), beta=0.5, **options)[0]
    assert (wrong > right).all()


def test_bpo_with_lr_generator_equals_dpo():
    batch = random_batch(seed=4)
    assert_close(
        LOSSES["bpo"](batch, beta=0.2, generator="lr")[0], LOSSES["dpo"](batch, beta=0.2)[0]
    )


@pytest.mark.parametrize("name", ["tbpo-q", "tbpo-a"])
def test_tbpo_with_lr_unit_weight_one_token_equals_dpo(name):
    """With one response token, w = 1 (log w = 0) and h = LR, TBPO's per-token logistic loss is DPO."""
    batch = random_batch(T=1, seed=5)
    zero = torch.zeros_like(batch.policy_chosen)
    batch = replace(
        batch, chosen_kl=zero, rejected_kl=zero, chosen_baseline=zero, rejected_baseline=zero
    )
    assert_close(
        LOSSES[name](batch, beta=0.7, generator="lr")[0], LOSSES["dpo"](batch, beta=0.7)[0]
    )


def test_tisdpo_with_unit_weights_equals_dpo_and_weights_get_no_gradient():
    """w = 1 everywhere and no KL term: TIS-DPO's weighted margin is DPO's margin."""
    batch = random_batch(seed=8)
    ones = torch.ones_like(batch.policy_chosen)
    unit = replace(batch, chosen_weight=ones, rejected_weight=ones)
    assert_close(LOSSES["tisdpo"](unit, beta=0.3)[0], LOSSES["dpo"](unit, beta=0.3)[0])
    weight = batch.chosen_weight.clone().requires_grad_()
    losses, _ = LOSSES["tisdpo"](replace(batch, chosen_weight=weight), beta=0.3, kl_coef=0.5)
    assert not losses.sum().requires_grad or (
        torch.autograd.grad(losses.sum(), weight, allow_unused=True)[0] is None
    )


def test_k3_with_many_samples_approaches_exact_kl():
    """Mean of k3 over tokens sampled from pi_ref -> KL(pi_ref || pi_theta)."""
    g = torch.Generator().manual_seed(0)
    ref_logits, policy_logits = torch.randn(50, generator=g), torch.randn(50, generator=g)
    log_q, log_p = ref_logits.log_softmax(-1).double(), policy_logits.log_softmax(-1).double()
    exact = (log_q.exp() * (log_q - log_p)).sum()
    samples = torch.multinomial(log_q.exp(), 400_000, replacement=True, generator=g)
    estimate = k3(log_p[samples] - log_q[samples]).mean()
    assert abs(estimate - exact) < 0.01 * exact + 1e-3
    assert (k3(torch.linspace(-5, 5, 101)) >= 0).all()


def test_metrics_are_detached_and_accurate():
    batch = random_batch(seed=6)
    batch = replace(batch, policy_chosen=batch.policy_chosen.clone().requires_grad_())
    for name in ALL:
        _, metrics = LOSSES[name](batch, beta=0.5)
        for key, value in metrics.items():
            assert not value.requires_grad, (name, key)
            assert value.shape == (5,), (name, key)
    _, metrics = LOSSES["dpo"](batch, beta=0.5)
    margin = metrics["reward_chosen"] - metrics["reward_rejected"]
    assert_close(metrics["reward_margin"], margin)
    assert_close(metrics["reward_accuracy"], (margin > 0).float() + 0.5 * (margin == 0))


def test_a_tie_counts_half_in_the_one_accuracy_definition():
    from tokenratio.losses import preference_accuracy

    chosen, rejected = torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.0, 1.0])
    assert preference_accuracy(chosen, rejected).tolist() == [1.0, 0.5, 0.0]
    batch = random_batch()  # the policy equal to the reference: every margin 0, accuracy 0.5
    batch = replace(batch, policy_chosen=batch.ref_chosen, policy_rejected=batch.ref_rejected)
    _, metrics = LOSSES["dpo"](batch, beta=0.5)
    assert metrics["reward_accuracy"].tolist() == [0.5] * 5


def test_unknown_names_and_options_are_value_errors():
    batch = random_batch()
    with pytest.raises(ValueError, match="valid losses"):
        LOSSES["tbpo"]
    with pytest.raises(ValueError, match="valid options"):
        LOSSES["dpo"](batch, beta=0.1, alpha=0.5)
    with pytest.raises(ValueError, match="valid"):
        LOSSES["bpo"](batch, beta=0.1, generator="hinge")
    with pytest.raises(ValueError, match="takes no 'lam'"):
        LOSSES["tbpo-a"](batch, beta=0.1, generator="lr", lam=0.5)
    with pytest.raises(ValueError, match="kl_estimator"):
        LOSSES["tbpo-a"](batch, beta=0.1, kl_estimator="k2")
    with pytest.raises(ValueError, match="lam must be"):
        LOSSES["bpo"](batch, beta=0.1, generator="ba", lam=-1.0)


def test_missing_inputs_name_the_field():
    batch = random_batch()
    bare = replace(
        batch, chosen_kl=None, rejected_kl=None, chosen_baseline=None, rejected_baseline=None
    )
    with pytest.raises(ValueError, match="chosen_kl"):
        LOSSES["tdpo2"](bare, beta=0.1)
    with pytest.raises(ValueError, match="chosen_baseline"):
        LOSSES["tbpo-q"](bare, beta=0.1)
    LOSSES["tbpo-a"](bare, beta=0.1, kl_estimator="k3-response")  # needs no KL field
    with pytest.raises(ValueError, match='kl_estimator="k3"'):
        LOSSES["tbpo-a"](bare, beta=0.1, kl_estimator="k3")  # the sampled estimate fills the field
    with pytest.raises(ValueError, match=r"chosen_weight.*tokenratio tisdpo"):
        LOSSES["tisdpo"](replace(batch, chosen_weight=None), beta=0.1)
    with pytest.raises(ValueError, match="chosen_kl"):
        LOSSES["tisdpo"](bare, beta=0.1, kl_coef=0.5)
    with pytest.raises(ValueError, match="shape"):
        replace(batch, policy_rejected=batch.policy_rejected[:, :3])


@pytest.mark.parametrize("name", ["dpo", "tbpo-a", "tbpo-q", "tisdpo"])
def test_reduce_accumulation_invariance(name):
    """One batch of 8 equals 4 micro-batches of 2 accumulated with reduce(num_pairs=8)."""
    batch = random_batch(B=8, seed=7)
    pc = batch.policy_chosen.clone().requires_grad_()

    def loss_of(rows):
        b = mapped(replace(batch, policy_chosen=pc), lambda v: v[rows])
        return LOSSES[name](b, beta=0.5)[0]

    full = reduce(loss_of(slice(0, 8)))
    (full_grad,) = torch.autograd.grad(full, pc)
    accumulated = sum(reduce(loss_of(slice(i, i + 2)), num_pairs=8) for i in range(0, 8, 2))
    (acc_grad,) = torch.autograd.grad(accumulated, pc)
    assert_close(accumulated, full)
    assert_close(acc_grad, full_grad)


@pytest.mark.parametrize(
    "name, options, expected",
    [
        ("dpo", {}, Needs()),
        ("ipo", {}, Needs()),
        ("bpo", {"generator": "lr"}, Needs()),
        ("tdpo1", {}, Needs(kl="exact")),
        ("tdpo2", {"alpha": 0.3}, Needs(kl="exact")),
        ("tbpo-q", {}, Needs(baseline=True)),
        ("tbpo-a", {}, Needs(kl="exact")),
        ("tbpo-a", {"kl_estimator": "k3"}, Needs(kl="k3")),
        ("tbpo-a", {"kl_estimator": "k3-response"}, Needs()),
        ("sft", {}, Needs(reference=False)),
        ("tisdpo", {}, Needs(weights=True)),
        ("tisdpo", {"kl_coef": 0.5}, Needs(kl="exact", weights=True)),
    ],
)
def test_registry_entries_declare_what_their_forward_pass_needs(name, options, expected):
    assert LOSSES[name].needs(options) == expected


def test_every_needed_field_is_read_and_nothing_else_is_required():
    """A loss given exactly what its entry declares runs; the declared fields are really read."""
    full = random_batch()
    for name in ALL:
        needs = LOSSES[name].needs()
        batch = replace(
            full,
            chosen_kl=full.chosen_kl if needs.kl else None,
            rejected_kl=full.rejected_kl if needs.kl else None,
            chosen_baseline=full.chosen_baseline if needs.baseline else None,
            rejected_baseline=full.rejected_baseline if needs.baseline else None,
            chosen_weight=full.chosen_weight if needs.weights else None,
            rejected_weight=full.rejected_weight if needs.weights else None,
        )
        losses, _ = LOSSES[name](batch, beta=0.5)
        assert torch.isfinite(losses).all(), name


def test_unknown_options_name_the_loss_and_its_real_options_before_any_work():
    with pytest.raises(ValueError, match=r"for loss 'tbpo-a'; valid options: \['generator'"):
        LOSSES["tbpo-a"].needs({"kl_estimatr": "k3"})
    assert "beta" not in LOSSES["tbpo-a"].options


def test_no_caller_tests_a_loss_name():
    """What a loss needs comes from its registry entry: nothing outside losses.py branches on a
    loss name (the issue found eight places that did)."""
    import re
    from pathlib import Path

    names = "|".join(re.escape(n) for n in LOSSES)
    branch = re.compile(rf"""(==|!=|\bin)\s*[\(\[{{]?\s*["']({names})["']""")
    root = Path(__file__).resolve().parents[1] / "src" / "tokenratio"
    offenders = [
        f"{path.relative_to(root)}:{number}: {line.strip()}"
        for path in root.rglob("*.py")
        if path.name != "losses.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if branch.search(line)
    ]
    assert not offenders, offenders


def test_tdpo1_with_the_lr_generator_is_todays_tdpo1():
    """-log sigma(z) computed directly, against the Bregman form with generator "lr"."""
    batch = random_batch(seed=3)
    losses, _ = LOSSES["tdpo1"](batch, beta=0.7)
    chosen_ratio = torch.where(batch.chosen_mask, batch.policy_chosen - batch.ref_chosen, 0)
    rejected_ratio = torch.where(batch.rejected_mask, batch.policy_rejected - batch.ref_rejected, 0)
    u = chosen_ratio.sum(-1) - rejected_ratio.sum(-1)
    seq_kl = [
        torch.where(m, k, 0).sum(-1)
        for m, k in ((batch.chosen_mask, batch.chosen_kl), (batch.rejected_mask, batch.rejected_kl))
    ]
    z = 0.7 * u - 0.7 * (seq_kl[1] - seq_kl[0])
    assert_close(losses, -torch.nn.functional.logsigmoid(z))


def test_tdpo1_is_unclamped_like_the_official_tdpo_loss_and_a_clamp_stays_an_option():
    """At beta z = -97.3 the official loss -logsigmoid(z) is 97.3, with gradient -1 in z; the
    authors' BPO bound (clamp=30) would give 30 and no gradient."""
    batch = make_batch(**PAIR, **KL)  # z = 0.8 at beta 1
    beta = -97.3 / 0.8
    policy = batch.policy_chosen.clone().requires_grad_(True)
    loss = LOSSES["tdpo1"](replace(batch, policy_chosen=policy), beta=beta)[0]
    assert_close(loss.item(), 97.3)
    loss.sum().backward()
    assert policy.grad.abs().sum() > 0
    clamped = LOSSES["tdpo1"](batch, beta=beta, clamp=30.0)[0].item()
    assert_close(clamped, math.log1p(math.exp(30.0)))


def test_a_tie_in_tisdpo_weighted_accuracy_counts_half():
    batch = make_batch(**PAIR, chosen_weight=[0.0, 0.0], rejected_weight=[0.0, 0.0])
    metrics = LOSSES["tisdpo"](batch, beta=1.0)[1]
    assert metrics["weighted_accuracy"].tolist() == [0.5]
