"""Every Triton kernel of the project compiles for Hopper (sm_90) here, without a GPU.

The other kernel tests run the kernels through Triton's interpreter, which executes the Python source and never
lowers it: a kernel can pass them and still fail to compile on the GPU (a shape that is not a compile-time
constant, a helper call the compiler cannot inline). Triton compiles for a target it is told about without a
device, through its own ptxas; this test does that for every kernel (training, streaming, cached and paged decode),
with the argument types and constants the launchers use. It runs in a subprocess because
TRITON_INTERPRET=1, set for the rest of the suite, turns every @triton.jit function into an interpreted one.
"""

import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import json
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kvshift.ops.mix import triton_kernels as mk
    from kvshift.ops.shift import paged_decode as pd
    from kvshift.ops.shift import triton_kernels as tk

    # weights and coefficients, RoPE tables, weight-grad partial sums, the paged decode's split statistics
    FP32 = {"WT", "WK", "WV", "CK", "CV", "COS", "SIN", "DWP", "M_OUT", "L_OUT", "ACC_OUT"}
    I32 = {"N", "T", "H", "D", "HALF", "NDOC", "ITERS", "Hq", "tiles_per_split",
           "skb", "skh", "svb", "svh"}
    I32_PTR = {"CU", "TABLE", "SEQ", "START"}  # document offsets, block tables, sequence lengths and starts

    def signature(fn, const):
        """bf16 tensors, fp32 weights/tables/sums, int32 offsets and sizes: the launchers' argument types."""
        out = {}
        for a in fn.arg_names:
            out[a] = ("constexpr" if a in const else "fp32" if a == "scale"
                      else "i32" if a in I32 or a.startswith("stride_") else "*i32" if a in I32_PTR
                      else "*fp32" if a in FP32 else "*bf16")
        return out

    cases = []
    for varlen, d in ((False, 64), (True, 128)):  # the launchers' tiles: 2048 elements per K tile pair
        bt = max(16, min(64, 2048 // (d // 2)))
        kv = dict(WKN=2, WVN=3, VARLEN=varlen, BLOCK_T=bt, BLOCK_DK=d // 2, BLOCK_DV=d, NSTEP=8 if varlen else 1)
        cases += [(tk.shift_kv_fwd_kernel, kv), (tk.shift_kv_bwd_kernel, kv)]
    cases += [(tk.shift_fwd_kernel, dict(W=2, HAS_PREV=True, VARLEN=True, ROPE=True, BLOCK_T=64, BLOCK_D=32, NSTEP=8)),
              (tk.shift_bwd_kernel, dict(W=3, HAS_PREV=True, VARLEN=False, ROPE=False, BLOCK_T=64, BLOCK_D=64,
                                         NSTEP=1)),
              (mk.mix_fwd_kernel, dict(W=2, HAS_PREV=False, VARLEN=True, BLOCK_T=32, BLOCK_D=64, NSTEP=8)),
              (mk.mix_bwd_kernel, dict(W=3, HAS_PREV=True, VARLEN=False, BLOCK_T=32, BLOCK_D=64, BLOCK_K=4, NSTEP=1,
                                       NEED_DW=True)),
              (mk.mix_bwd_kernel, dict(W=1, HAS_PREV=False, VARLEN=True, BLOCK_T=32, BLOCK_D=64, BLOCK_K=2, NSTEP=8,
                                       NEED_DW=False)),
              # the gradient of a streamed chunk's history (prev), the cached decode step, the paged decode
              (tk.shift_dprev_kernel, dict(W=2, VARLEN=True, ROPE=True, BLOCK_D=64)),
              (mk.mix_dprev_kernel, dict(W=3, VARLEN=False, BLOCK_D=64)),
              (tk.decode_kernel, dict(REP=2, WKN=2, WVN=3, BLOCK_H=32, BLOCK_D=64)),
              # the decode kernel with its launcher's own constants: the dense cache's 64-slot tiles (bf16, TF32
              # matmuls), an 8-slot paged block in fp32 (exact matmuls), a 128-wide head with a group of 8
              (pd.paged_shift_decode_kernel, pd.launch_constants(64, 4, 64, 2, 2, torch.bfloat16)),
              (pd.paged_shift_decode_kernel, pd.launch_constants(8, 1, 8, 3, 1, torch.float32)),
              (pd.paged_shift_decode_kernel, pd.launch_constants(16, 8, 128, 4, 3, torch.float16))]
    every = {n for m in (tk, mk, pd) for n, f in vars(m).items()
             if n.endswith("_kernel") and isinstance(f, triton.runtime.jit.JITFunction)}
    assert every == {fn.__name__ for fn, _ in cases}, ("kernels without a compile case",
                                                       every - {fn.__name__ for fn, _ in cases})
    done = []
    for fn, const in cases:
        assert set(const) <= set(fn.arg_names), (fn.__name__, set(const) - set(fn.arg_names))
        opts = {"num_stages": pd.DEFAULT_STAGES} if fn is pd.paged_shift_decode_kernel else None  # as launched
        k = triton.compile(ASTSource(fn=fn, signature=signature(fn, const), constexprs=const),
                           target=GPUTarget("cuda", 90, 32), options=opts)
        assert ".entry " + fn.__name__ in k.asm["ptx"], fn.__name__
        done.append(fn.__name__)
    print(json.dumps(done))
''')


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia import compiler as nv  # noqa: F401
    except Exception:  # noqa: BLE001 (a triton build without the NVIDIA backend)
        return False
    root = os.path.dirname(nv.__file__)
    return os.path.exists(os.path.join(root, "bin", "ptxas"))


@pytest.mark.skipif(not _ptxas_available(), reason="this Triton has no NVIDIA backend with its ptxas")
def test_shift_kernels_compile_for_hopper(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a real compile, not a cache hit
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == (
        '["shift_kv_fwd_kernel", "shift_kv_bwd_kernel", "shift_kv_fwd_kernel", "shift_kv_bwd_kernel", '
        '"shift_fwd_kernel", "shift_bwd_kernel", "mix_fwd_kernel", "mix_bwd_kernel", "mix_bwd_kernel", '
        '"shift_dprev_kernel", "mix_dprev_kernel", "decode_kernel", "paged_shift_decode_kernel", '
        '"paged_shift_decode_kernel", "paged_shift_decode_kernel"]')
