"""mixed_precision = "auto" (precision.py): bf16 only where the hardware multiplies it natively."""

import pytest
import torch

from tokenratio import precision
from tokenratio.config import TrainConfig


@pytest.fixture(autouse=True)
def _onednn_uncapped(monkeypatch):
    """These tests give the CPU's flags; an emulating ONEDNN_MAX_CPU_ISA must not override them."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)


def test_auto_is_the_default():
    assert TrainConfig().mixed_precision == "auto"


def test_auto_on_a_cpu_without_native_bf16_is_fp32():
    chosen = precision.resolve("auto", on_cpu=True, flags={"avx2", "avx512f", "fma"})
    assert chosen.mode == "no"
    assert "no native bf16" in chosen.describe() and "4-33x slower" in chosen.describe()


def test_auto_on_a_cpu_with_native_bf16_is_bf16():
    for flag in ("avx512_bf16", "amx_bf16", "bf16"):
        chosen = precision.resolve("auto", on_cpu=True, flags={"avx2", flag})
        assert chosen.mode == "bf16" and flag in chosen.reason


def test_an_explicit_precision_is_kept_whatever_the_cpu():
    for mode in ("no", "bf16", "fp16"):
        assert precision.resolve(mode, on_cpu=True, flags=set()).mode == mode


def test_cpu_flags_are_read_from_x86_and_arm_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert precision.cpu_has_native_bf16(precision.cpu_flags(x86)) == "avx512_bf16"
    assert precision.cpu_has_native_bf16(precision.cpu_flags(arm)) == "bf16"
    assert precision.cpu_flags(tmp_path / "missing") == set()


def test_the_config_is_resolved_before_anything_keys_on_it():
    from tokenratio.config import Config

    cfg, chosen = precision.resolved_config(Config(), on_cpu=True)
    assert cfg.train.mixed_precision == chosen.mode != "auto"


def test_bf16_weights_on_a_cpu_without_native_bf16_warn_once(monkeypatch):
    said = []
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda flags=None: None)
    assert precision.warn_if_slow_bf16(torch.bfloat16, True, said.append)
    assert not precision.warn_if_slow_bf16(torch.float32, True, said.append)
    assert not precision.warn_if_slow_bf16(torch.bfloat16, False, said.append)
    assert len(said) == 1 and "float32" in said[0]
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda flags=None: "amx_bf16")
    assert not precision.warn_if_slow_bf16(torch.bfloat16, True, said.append)


def test_onednn_capped_below_bf16_is_no_native_bf16():
    """ONEDNN_MAX_CPU_ISA=AVX2 (an AVX2-only CPU, emulated) keeps oneDNN off bf16 instructions."""
    flags = {"avx2", "avx512_bf16"}
    assert precision.cpu_has_native_bf16(flags, {"ONEDNN_MAX_CPU_ISA": "AVX2"}) is None
    assert precision.cpu_has_native_bf16(flags, {"ONEDNN_MAX_CPU_ISA": "avx512_core"}) is None
    assert precision.cpu_has_native_bf16(flags, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"})
    assert precision.cpu_has_native_bf16(flags, {}) == "avx512_bf16"
