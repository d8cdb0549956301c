"""The shift kernels compile for Hopper (sm_90) here, without a GPU.

The other kernel tests run the kernels through Triton's interpreter, which executes the Python source and never
lowers it: a kernel can pass them and still fail to compile on the GPU (a shape that is not a compile-time
constant, a helper call the compiler cannot inline). Triton compiles for a target it is told about without a
device, through its own ptxas; this test does that for the shift kernels every KV-shift training step and
decode step goes through, with the layouts and constants the launchers use. It runs in a subprocess because
TRITON_INTERPRET=1, set for the rest of the suite, turns every @triton.jit function into an interpreted one.
"""

import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kvshift.ops.shift import triton_kernels as tk

    ROW = {"N": "i32", "T": "i32", "H": "i32", "D": "i32", "HALF": "i32", "stride_cb": "i32", "stride_ct": "i32"}
    DOC = {"CU": "*i32", "NDOC": "i32", "COS": "*fp32", "SIN": "*fp32"}

    def kv(names, extra):
        return {**{n: "*bf16" for n in names[:2]}, "WK": "*fp32", "WV": "*fp32", **DOC,
                **{n: "*bf16" for n in names[2:]}, **extra, **ROW}

    def one(names):
        return {"X": "*bf16", "WT": "*fp32", "PREV": "*bf16", **DOC, **{n: "*bf16" for n in names}}

    C = lambda **kw: kw  # noqa: E731
    cases = []
    for varlen, d in ((False, 64), (True, 128)):  # the launchers' tiles: 2048 elements per K tile pair
        bt = max(16, min(64, 2048 // (d // 2)))
        kvc = C(WKN=2, WVN=3, VARLEN=varlen, BLOCK_T=bt, BLOCK_DK=d // 2, BLOCK_DV=d, NSTEP=8 if varlen else 1)
        cases.append(("shift_kv_fwd_kernel", kv(["K", "V", "YK", "YV"], {}), kvc))
        cases.append(("shift_kv_bwd_kernel", kv(["K", "V", "DYK", "DYV", "DK", "DV"], {"DWP": "*fp32"}), kvc))
    cases.append(("shift_fwd_kernel", {**one(["Y"]), **ROW},
                  C(W=2, HAS_PREV=True, VARLEN=True, ROPE=True, BLOCK_T=64, BLOCK_D=32, NSTEP=8)))
    cases.append(("shift_bwd_kernel", {**one(["DY", "DX"]), "DWP": "*fp32", **ROW},
                  C(W=3, HAS_PREV=True, VARLEN=False, ROPE=False, BLOCK_T=64, BLOCK_D=64, NSTEP=1)))
    done = []
    for name, sig, const in cases:
        fn = getattr(tk, name)
        args = list(fn.arg_names)
        missing = set(args) - set(sig) - set(const)
        assert not missing, (name, missing)  # the signature names every argument the kernel takes
        sig = {a: ("constexpr" if a in const else sig[a]) for a in args}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32))
        assert ".entry " + name in k.asm["ptx"], name
        done.append(name)
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
        '"shift_fwd_kernel", "shift_bwd_kernel"]')
