"""How much slower (or faster) bf16 autocast is than fp32 on this CPU, for SmolLM2-135M's LM
head matmul (hidden 576 -> 49,152 tokens), forward and backward: the number precision.py quotes.

    python scripts/bf16_cpu.py                       # this CPU as it is
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python scripts/bf16_cpu.py   # its AVX2 kernels

Prints the CPU's capability, whether it has native bf16, and the median time of each.
"""

import statistics
import time

import torch

from tokenratio.precision import cpu_has_native_bf16

ROWS, HIDDEN, VOCAB = 512, 576, 49_152  # 512 response tokens of a batch through SmolLM2's head


def timed(precision: str, backward: bool, repeats: int = 5) -> float:
    torch.manual_seed(0)
    hidden = torch.randn(ROWS, HIDDEN, requires_grad=backward)
    weight = torch.randn(VOCAB, HIDDEN, requires_grad=backward)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = hidden @ weight.T
        if backward:
            logits.float().logsumexp(-1).sum().backward()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])  # the first warms the kernels up


def main() -> None:
    print(
        f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, native bf16: "
        f"{cpu_has_native_bf16() or 'no'}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    for backward in (False, True):
        fp32, bf16 = timed("fp32", backward), timed("bf16", backward)
        what = "forward + backward" if backward else "forward"
        print(
            f"head matmul ({ROWS} x {HIDDEN} -> {VOCAB:,}), {what}: fp32 {fp32 * 1e3:.0f} ms, "
            f"bf16 autocast {bf16 * 1e3:.0f} ms: bf16 takes {bf16 / fp32:.2f}x fp32's time"
        )


if __name__ == "__main__":
    main()
