"""The exact tensor-memory count: known allocations give known peaks."""

import torch

from tokenratio.memory import peak_tensor_bytes


def test_peak_counts_live_tensors_and_forgets_freed_ones():
    def two_at_once():
        a = torch.empty(1 << 20, dtype=torch.float32)  # 4 MiB
        b = torch.empty(1 << 20, dtype=torch.float32)  # 4 MiB, both alive
        return a.numel() + b.numel()

    def one_after_another():
        for _ in range(3):
            a = torch.empty(1 << 20, dtype=torch.float32)
            del a

    assert peak_tensor_bytes(two_at_once) >= 8 << 20
    assert 4 << 20 <= peak_tensor_bytes(one_after_another) < 8 << 20
