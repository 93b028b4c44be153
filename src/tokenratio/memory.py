"""Exact tensor-memory measurement from the profiler's allocator events (deterministic, unlike the
resident set on a shared VM). Used by `tokenratio perf` and the memory tests of the kernels."""


def peak_tensor_bytes(fn) -> int:
    """Largest number of bytes `fn` has allocated and not yet freed at any moment while it runs.

    Exact and deterministic: the profiler records every allocation and free of torch's CPU
    allocator in order (autograd's saved tensors included), and their running sum is the live
    tensor memory beyond what existed before the call.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # + on allocation, - on free
        peak = max(peak, live)
    return peak
