"""`mixed_precision = "auto"`: the autocast precision this hardware runs fastest at its accuracy.

bf16 autocast halves the bytes a matmul reads, but only hardware that multiplies bf16 natively is
faster for it: GPUs from Ampere on, and CPUs with AVX512-BF16 or AMX (x86) or the BF16 extension
(Arm). Without them (AVX2 only, or AVX512 without BF16) every operand is converted to fp32 and
back: SmolLM2's head matmul with AVX2 kernels took 3.8x fp32's time forward and 33x forward and
backward (`scripts/bf16_cpu.py`, docs/training.md "Precision"). So "auto" is bf16 where it is
native and fp32 ("no") elsewhere, and the run says which and why in one line.
"""

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 (two kinds), Arm's FEAT_BF16
# SmolLM2's head matmul, bf16 autocast against fp32, forward / forward and backward, with AVX2
# kernels (scripts/bf16_cpu.py, docs/training.md "Precision").
SLOWDOWN_WITHOUT_NATIVE_BF16 = "4-33x"


@dataclass(frozen=True)
class Precision:
    mode: str  # no | bf16 | fp16: what Accelerate's autocast is given
    reason: str  # why, for the run's plan line

    def describe(self) -> str:
        name = {"no": "fp32 (no autocast)", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}
        return f"{name[self.mode]}; {self.reason}"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as Linux lists them (x86 `flags`, Arm `Features`); empty elsewhere."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


# oneDNN ISAs without bf16 arithmetic: ONEDNN_MAX_CPU_ISA set to one of them keeps oneDNN off the
# CPU's bf16 instructions (how an AVX2-only CPU is emulated), so bf16 is not native there.
ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_has_native_bf16(flags: set[str] | None = None, environ=os.environ) -> str | None:
    """The flag that says this CPU multiplies bf16 natively (and oneDNN may use it), or None."""
    if environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ISAS_WITHOUT_BF16:
        return None
    flags = cpu_flags() if flags is None else flags
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), None)


def resolve(requested: str, on_cpu: bool, flags: set[str] | None = None) -> Precision:
    """The precision a run uses: what was asked for, or for "auto" what this hardware runs fast."""
    if requested != "auto":
        return Precision(requested, "as configured (train.mixed_precision)")
    if not on_cpu:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return Precision("bf16", f"auto: {torch.cuda.get_device_name()} supports bf16")
        return Precision("no", "auto: this accelerator has no bf16 (fp16 needs a loss scaler)")
    native = cpu_has_native_bf16(flags)
    if native:
        return Precision("bf16", f"auto: this CPU multiplies bf16 natively ({native})")
    return Precision(
        "no",
        "auto: this CPU has no native bf16 (no avx512_bf16/amx_bf16), where bf16 is "
        f"{SLOWDOWN_WITHOUT_NATIVE_BF16} slower",
    )


def resolved_config(cfg, on_cpu: bool):
    """cfg with train.mixed_precision resolved (what caches key on and config.json records) and
    the Precision that says why."""
    precision = resolve(cfg.train.mixed_precision, on_cpu)
    return replace(cfg, train=replace(cfg.train, mixed_precision=precision.mode)), precision


def warn_if_slow_bf16(dtype, on_cpu: bool, say=None) -> bool:
    """One line when bf16 weights will train on a CPU without native bf16; True if it warned."""
    import torch

    if dtype != torch.bfloat16 or not on_cpu or cpu_has_native_bf16():
        return False
    (say or (lambda text: print(text, file=sys.stderr)))(
        "tokenratio: training bf16 weights on a CPU without native bf16 is "
        f"{SLOWDOWN_WITHOUT_NATIVE_BF16} slower than float32 (scripts/bf16_cpu.py): load the "
        "model with dtype=torch.float32"
    )
    return True
