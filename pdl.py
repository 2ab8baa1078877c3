"""Programmatic dependent launch (PDL) for the engine's Triton kernels, Hopper (sm_90) and later.

A batch-1 decode step is about 300 short kernels. Without PDL each one is launched only after the
one before it has finished and its writes are flushed, so every boundary costs a launch's latency
while the SMs idle. Launched with PDL, a kernel's programs may start once every program of the
kernel before it has called `let_dependents_launch` (or exited), and they wait in
`wait_for_inputs` for that kernel to finish before they read its outputs or write anything.

Where the signal goes matters. Given at the start of a weight product's or attention kernel's
programs, the next kernel's programs landed on the SMs that happened to free up first and waited
there, which unbalanced it: 4-layer steps on an H200 ran 2-7% slower at batch 8. So those kernels
signal after their main loop, and the next kernel's launch overlaps only their last programs'
epilogues (no case measured more than 0.2% slower, docs/results.md). Kernels whose programs are
one short wave (the RMSNorm, the attention combine, the cache write, the split products' sums)
signal at their start: their programs are all on the SMs already, and the kernel after them is
waiting there when they end.
Every program of every kernel launched this way calls `wait_for_inputs` before its first load of
another kernel's output and its first store, so a kernel finishes only after the one before it
has, and the order of results is what it was.

Only the engine's own kernels launch this way; inductor's (its `enable_pdl` option) did not gain
on top. On an A100 (sm_80) nothing changes: the kernels compile without the instructions.
"""
import functools

import torch
import triton
import triton.language as tl

ENABLED = True  # False: every kernel launches as before (for timing against it)


@functools.lru_cache(maxsize=None)
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def options(t: torch.Tensor) -> dict:
    """The launch options for a kernel whose inputs live with `t`: the kernel's PDL constexpr, and
    the launch attribute where the GPU has it. CPU tensors (the interpreter) never use it."""
    if not (ENABLED and t.is_cuda):
        return {"PDL": False}
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return {"PDL": True, "launch_pdl": True} if _supported(index) else {"PDL": False}


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Every program calls this before its first load of another kernel's output and before its
    first store: it returns when the kernel before has finished and its writes are visible."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def let_dependents_launch(PDL: tl.constexpr):
    """The next kernel may launch once every program got here or exited (after the main loop, or
    at the start of a one-wave kernel: the module's docstring says where)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
