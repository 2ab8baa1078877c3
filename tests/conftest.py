"""Shared fixtures and test settings.

Hypothesis runs derandomized (examples drawn from a fixed seed, no example database), so a run's
result does not depend on luck or on what an earlier run in the same clone found. To search for
new failures set HYPOTHESIS_PROFILE=explore (random, with the database) or pass
--hypothesis-seed=N.
"""
import os

import pytest
import torch
from hypothesis import settings

from default_model import DEFAULT_CHECKPOINT, prepare_default

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run under the interpreter (tests/test_decode_attention.py,
    # tests/test_ring_append.py); it must be chosen before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(scope="session")
def default_checkpoint():
    """model.pth of the real default model, prepared (downloaded and converted) on first use."""
    return prepare_default(DEFAULT_CHECKPOINT)


@pytest.fixture
def triton_interpreter(monkeypatch):
    """The Triton interpreter, patched to compute what the GPU computes where its numpy emulation
    differs: bf16 dot operands are bf16 values (it multiplies their bit patterns), fp32 -> bf16 and
    fp32 -> fp8 e4m3 round to nearest even (it truncates), int8 -> bf16 gives the value (not its
    bits), fp32 dot operands lose their 13 low mantissa bits as tf32 (truncation: the worse case),
    fp16 operands multiply exactly into fp32 sums, and int() of a loaded scalar works under
    numpy >= 2.4."""
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as ti
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.cdiv, InterpretedFunction):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 (set above, before any import of triton)")
    orig_patch, orig_cast = ti._patch_lang_tensor, ti.InterpreterBuilder.cast_impl
    torch_dtypes = {tl.bfloat16: (torch.bfloat16, np.uint16), tl.float8e4nv: (torch.float8_e4m3fn, np.uint8)}

    def patch_tensor(tensor, scope):
        orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def value(x):
            if x.dtype.scalar == tl.bfloat16:
                return (x.data.astype(np.uint32) << 16).view(np.float32)
            if x.dtype.scalar == tl.float32 and input_precision == ir.INPUT_PRECISION.TF32:
                return (x.data.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)
            return x.data.astype(np.float32)
        return ti.TensorHandle(np.matmul(value(a), value(b), dtype=d.data.dtype) + d.data, d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        # From fp32, or from integers (exact in fp32 at the sizes cast here: int8 weight codes).
        src_type = src.dtype.scalar
        exact_in_fp32 = src_type == tl.float32 or (src_type.is_int() and src_type.primitive_bitwidth <= 16)
        if exact_in_fp32 and dst_type.scalar in torch_dtypes:
            torch_dtype, bits = torch_dtypes[dst_type.scalar]
            t = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch_dtype)
            return ti.TensorHandle(t.view(torch.uint16 if bits == np.uint16 else torch.uint8).numpy().view(bits),
                                   dst_type.scalar)
        return orig_cast(self, src, dst_type)

    monkeypatch.setattr(ti, "_patch_lang_tensor", patch_tensor)
    monkeypatch.setattr(ti.InterpreterBuilder, "create_dot", create_dot)
    monkeypatch.setattr(ti.InterpreterBuilder, "cast_impl", cast_impl)
    orig_fp_to_fp = ti.InterpreterBuilder.create_fp_to_fp

    def fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar in torch_dtypes:
            return cast_impl(self, src, dst_type)
        return orig_fp_to_fp(self, src, dst_type, rounding_mode)

    monkeypatch.setattr(ti.InterpreterBuilder, "create_fp_to_fp", fp_to_fp)
