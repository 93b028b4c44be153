"""An independent, deliberately naive implementation of every loss: Python loops over pairs and tokens
with `math` on floats, written from docs/method.md without reading tokenratio.losses. Tests compare the
library against it on random inputs.
"""

import math


def _softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def _generator(name, log_r, lam, s):
    R = math.exp(log_r)
    if name == "lr":
        return math.log(1 + R)
    if name == "kliep":
        return R + log_r
    if name == "lsif":
        return R**2 - 2 / R
    if name == "ba":
        return R + log_r if lam == 0 else R ** (lam + 1) - (lam + 1) / lam * R ** (-lam)
    if name == "sba":
        if lam == 0:
            return (R + log_r) / s
        return R ** (lam + 1) / (s * (lam + 1)) - R ** (-lam) / (s * lam)
    raise KeyError(name)


def _rows(pair):
    """Lists of per-token floats of one pair, cut to each response's length."""
    n_c, n_r = pair["len_chosen"], pair["len_rejected"]
    rc = [pair["policy_chosen"][t] - pair["ref_chosen"][t] for t in range(n_c)]
    rr = [pair["policy_rejected"][t] - pair["ref_rejected"][t] for t in range(n_r)]
    return rc, rr


def naive_loss(name, pair, beta, **o):
    """Loss of one pair. `pair` holds python lists and the two response lengths."""
    rc, rr = _rows(pair)
    u = sum(rc) - sum(rr)
    if name == "dpo":
        eps = o.get("label_smoothing", 0.0)
        return (1 - eps) * _softplus(-beta * u) + eps * _softplus(beta * u)
    if name == "ipo":
        v = sum(rc) / len(rc) - sum(rr) / len(rr)
        return (v - 1 / (2 * beta)) ** 2
    if name == "bpo":
        log_r = max(-30.0, min(30.0, -beta * u))
        return _generator(o.get("generator", "sba"), log_r, o.get("lam", 0.0), o.get("s", 4.0))
    if name in ("tdpo1", "tdpo2"):
        kc = sum(pair["chosen_kl"][: pair["len_chosen"]])
        kr = sum(pair["rejected_kl"][: pair["len_rejected"]])
        alpha = 1.0 if name == "tdpo1" else o.get("alpha", 0.5)
        z = beta * u - alpha * beta * (kr - kc)
        if name == "tdpo2" or (o.get("generator", "lr") == "lr" and "clamp" not in o):
            return _softplus(-z)  # TDPO's own form, unclamped
        log_r = max(-30.0, min(30.0, -z))  # Bregman form: l(R), log R = -z (clamped)
        return _generator(o.get("generator", "lr"), log_r, o.get("lam", 0.0), o.get("s", 4.0))
    if name == "sft":
        n = pair["len_chosen"]
        return -sum(pair["policy_chosen"][:n]) / n
    if name == "tisdpo":
        wc, wr = pair["chosen_weight"], pair["rejected_weight"]
        margin = sum(wc[t] * rc[t] for t in range(len(rc))) - sum(
            wr[t] * rr[t] for t in range(len(rr))
        )
        kl_coef = o.get("kl_coef", 0.0)
        kc = sum(wc[t] * pair["chosen_kl"][t] for t in range(len(rc)))
        kr = sum(wr[t] * pair["rejected_kl"][t] for t in range(len(rr)))
        return _softplus(-(beta * margin - kl_coef * beta * (kc - kr)))
    if name in ("tbpo-q", "tbpo-a"):
        T = min(pair["len_chosen"], pair["len_rejected"])
        if name == "tbpo-q":
            log_w = [pair["rejected_baseline"][t] - pair["chosen_baseline"][t] for t in range(T)]
            if o.get("center_log_w", True):
                mean = sum(log_w) / T
                log_w = [x - mean for x in log_w]
            c = o.get("log_w_clamp", 10.0)
            if c is not None:
                log_w = [max(-c, min(c, x)) for x in log_w]
        elif o.get("kl_estimator", "exact") in ("exact", "k3"):  # both read the KL fields
            log_w = [pair["rejected_kl"][t] - pair["chosen_kl"][t] for t in range(T)]
        else:
            k3 = [math.expm1(x) - x for x in (rc[t] for t in range(T))]
            k3_rej = [math.expm1(x) - x for x in (rr[t] for t in range(T))]
            log_w = [k3_rej[t] - k3[t] for t in range(T)]
        total = 0.0
        for t in range(T):
            log_r = beta * (rr[t] - rc[t] + log_w[t])
            log_r = max(-30.0, min(30.0, log_r))
            total += _generator(
                o.get("generator", "sba"), log_r, o.get("lam", 0.0), o.get("s", 4.0)
            )
        return total / T
    raise KeyError(name)
