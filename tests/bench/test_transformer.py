"""The transformer policy class through the real scoring path."""

import pytest


@pytest.mark.slow
def test_transformer_policy_class_fits_the_reference_and_learns():
    """The second policy class: SFT brings a tiny Llama close to pi_ref, and DPO through the
    real-model code path moves it toward the optimum (sampled metrics with 95% intervals)."""
    from tokenratio.bench.transformer import run_transformer

    result = run_transformer(
        ["dpo", "tbpo-a", "tisdpo"], sft_steps=200, train_steps=40, num_samples=1000, progress=False
    )
    fit, half_width = result["reference_fit_kl"]
    assert fit < 0.3 and half_width > 0
    reference, dpo = result["rows"]["sft-reference"], result["rows"]["dpo"]
    assert dpo["return"][0] > reference["return"][0] + 1.0
    assert dpo["kl_seq"][0] < reference["kl_seq"][0] - 0.5
    assert result["rows"]["tbpo-a"]["kl_tok"][0] < reference["kl_tok"][0]
    assert result["rows"]["tisdpo"]["return"][0] > reference["return"][0] + 0.5  # weighted, learns
