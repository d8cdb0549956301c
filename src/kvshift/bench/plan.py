"""What a bench run measures and the helpers every part shares.

Arms: "vanilla" (attention="vanilla"), "naive" (attention="kvshift", shift_impl="naive"),
"fused-sdpa" (shift_impl="triton" with separate shift ops and SDPA: `set_fused_attention(model, False)`),
"fused" (shift_impl="triton", the layer's default: shift, RoPE(K) and attention in one op that saves only
raw k, v, `kvshift.ops.shift.attention`, with cuDNN attention kernels) and "fused-flash" (the same op with
PyTorch's flash kernels). The targets are judged on "fused". The Triton arms are skipped where Triton
cannot run.
"""

from __future__ import annotations

import gc
import re
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

from kvshift.layers.attention import set_fused_attention
from kvshift.models import LM, ModelConfig
from kvshift.ops.shift import triton_available

# attn and generate supersede block and decode (their docstrings say why); those two still run when asked
# for by name and their earlier results are still read and shown, marked superseded, without targets
PARTS = ("attn", "generate", "e2e", "block", "decode")
DEFAULT_PARTS = ("attn", "generate", "e2e")
LEGACY_PARTS = ("block", "decode")
ARM_MODEL = {"vanilla": dict(attention="vanilla"), "naive": dict(attention="kvshift", shift_impl="naive"),
             "fused-sdpa": dict(attention="kvshift", shift_impl="triton"),
             "fused": dict(attention="kvshift", shift_impl="triton"),
             "fused-flash": dict(attention="kvshift", shift_impl="triton")}
# the short mixers of ModelConfig.mixer on vanilla attention, on their fused causal-mix kernels (e2e part only,
# when asked for with --e2e-arms): what each member of the family costs in training
MIXER_ARMS = ("dconv", "canon", "keyoffset", "smear")
ARM_MODEL.update({m: dict(attention="vanilla", mixer=m, shift_impl="triton") for m in MIXER_ARMS})
E2E_ARMS = ("vanilla", "naive", "fused-sdpa", "fused", "fused-flash")  # the default e2e arms
# e2e cases beyond the default plan, run when `--models` names them: a ~1B model users would train (d 2048,
# 20 layers, GQA 16/4, T 4096: 1.03B parameters), packed documents (rows of real document lengths, position ids
# restarting at each document, as the trainer feeds them) and a long context (T 16,384).
# label -> (preset, overrides, seq_len, batch, layout); layout "dense" (one random sequence per row) or "packed"
E2E_MORE = {
    "bench-1b": ("bench-246m", dict(dim=2048, n_layers=20, n_heads=16, n_kv_heads=4, ffn_dim=5632, max_seq_len=4096),
                 4096, 4, "dense"),
    "bench-162m-packed": ("bench-162m", {}, 1024, 32, "packed"),
    "bench-246m-packed": ("bench-246m", {}, 2048, 16, "packed"),
    "bench-246m-16k": ("bench-246m", {"max_seq_len": 16384}, 16384, 2, "dense"),
}
E2E_MORE_QUICK = {"debug-packed": ("debug", {}, 48, 2, "packed")}  # the quick plan's (CPU smoke tests)
ARM_IMPL = {"naive": "naive", "fused-sdpa": "triton", "fused": "triton", "fused-flash": "triton"}
TRITON_ARMS = ("fused-sdpa", "fused", "fused-flash") + MIXER_ARMS
ARM_BACKEND = {"fused": "auto", "fused-flash": "flash"}  # the one-op arms' attention kernels
BLOCK_MODES = ("eager", "compiled")


def build_model(cfg: ModelConfig, arm: str, seed: int) -> LM:
    """The arm's model: the config's attention/impl from ARM_MODEL, the one-op shift + attention path
    on for "fused" (cuDNN attention kernels) and "fused-flash" (flash kernels), off for "fused-sdpa"."""
    return set_fused_attention(LM(cfg.replace(**ARM_MODEL[arm]), seed=seed), arm in ARM_BACKEND,
                               ARM_BACKEND.get(arm, "auto"))


@dataclass
class Plan:
    """What one run measures: `full()` is the issue's H200 benchmark, `quick_plan()` tiny shapes
    and few iterations (CPU smoke runs, tests)."""
    quick: bool
    # block: (B, T, H, H_kv, D)
    block_shapes: list[tuple[int, int, int, int, int]]
    block_warmup: int
    block_iters: int
    # e2e: (label, preset, overrides, seq_len, batch)
    e2e_models: list[tuple[str, str, dict, int, int]]
    e2e_warmup: int  # the first warm-up step compiles
    e2e_iters: int
    # decode
    decode_model: str
    decode_overrides: dict
    decode_context: int
    decode_batches: list[int]
    decode_warmup: int
    decode_iters: int
    # attn (kvshift.bench.attn): block_shapes x families x block_modes
    attn_families: tuple[str, ...] = ("cudnn", "flash")
    attn_warmup: int = 5
    attn_iters: int = 30  # per synchronised timing, and the N of each back-to-back round
    attn_rounds: int = 5
    attn_grad: str = "tensor"  # "tensor": a (B, T, H*D) gradient; "wo": through a real output projection
    attn_graph: bool = True  # also time a CUDA graph of each arm's step (CUDA only)
    # generate (kvshift.bench.generate): one entry per case, (batch, prompt tokens[, True: left-padded prompts])
    gen_model: str = "bench-246m"
    gen_cases: list[tuple] = field(default_factory=lambda: [(1, 2048), (16, 2048), (128, 2048),
                                                            (1, 8192), (16, 8192), (128, 8192)])
    gen_new_tokens: int = 128
    gen_warmup: int = 1
    gen_iters: int = 3
    gen_arms: tuple[str, ...] | None = None  # None: every arm of kvshift.bench.generate.GEN_ARMS
    gen_compile: bool = True  # the *-compiled arms (LM.generate(compile=True); transformers' compiled decode)
    compile: bool = True
    block_modes: tuple[str, ...] = BLOCK_MODES
    profile: bool = False
    peak_flops: float | None = None  # None: by device name (989e12 for H100/H200)
    seed: int = 0
    parts: tuple[str, ...] = DEFAULT_PARTS
    e2e_arms: tuple[str, ...] = E2E_ARMS  # vanilla always runs first

    @classmethod
    def full(cls) -> "Plan":
        return cls(quick=False,
                   block_shapes=[(8, 2048, 16, 16, 128), (4, 4096, 32, 8, 128), (16, 1024, 12, 12, 64)],
                   block_warmup=5, block_iters=40,
                   e2e_models=[("bench-162m", "bench-162m", {}, 1024, 32), ("bench-246m", "bench-246m", {}, 2048, 16)],
                   e2e_warmup=3, e2e_iters=20,
                   decode_model="bench-246m", decode_overrides={}, decode_context=8192, decode_batches=[1, 32],
                   decode_warmup=5, decode_iters=40)

    @classmethod
    def quick_plan(cls, cuda: bool) -> "Plan":
        return cls(quick=True,
                   block_shapes=[(2, 32, 4, 4, 32), (1, 33, 4, 2, 16)],
                   block_warmup=1, block_iters=3,
                   e2e_models=[("debug", "debug", {}, 32, 2), ("debug-mha", "debug", {"n_kv_heads": 4}, 16, 2)],
                   e2e_warmup=1, e2e_iters=3,
                   decode_model="debug", decode_overrides={}, decode_context=40, decode_batches=[1, 2],
                   decode_warmup=1, decode_iters=3,
                   attn_families=("cudnn", "flash") if cuda else ("flash", "math"), attn_warmup=1, attn_iters=3,
                   attn_rounds=2, attn_graph=cuda,
                   gen_model="debug", gen_cases=[(1, 12), (2, 12)], gen_new_tokens=4, gen_warmup=1, gen_iters=2,
                   gen_compile=cuda,
                   compile=cuda,  # CPU inductor compiles take far longer than the quick run itself
                   block_modes=BLOCK_MODES if cuda else ("eager",))

    def with_steps(self, steps: int | None, warmup: int | None) -> "Plan":
        if steps is not None:
            if steps < 1:
                raise ValueError(f"steps must be >= 1, got {steps}")
            self.block_iters = self.e2e_iters = self.decode_iters = self.attn_iters = steps
        if warmup is not None:
            if warmup < 1:
                raise ValueError(f"warmup must be >= 1 (the first e2e step compiles), got {warmup}")
            self.block_warmup = self.e2e_warmup = self.decode_warmup = self.attn_warmup = self.gen_warmup = warmup
        return self


# ---- helpers shared by the parts ----------------------------------------------------------------
def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200'; CPU results are 'cpu'."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown"


def device_name(device: torch.device) -> str:
    """The GPU's name, or "cpu": unlike `kvshift.utils.provenance.device_name` ("cpu (N cores)"), so a CPU
    result is always cpu.json and an earlier CPU result is found again whatever the core count."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def timer_name(device: torch.device) -> str:
    """What `timing.measure` times with on this device (recorded in every part's settings)."""
    return "cuda-events" if device.type == "cuda" else "perf_counter"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def error_entry(e: BaseException) -> dict:
    """A failed case or arm as recorded in the result (the traceback goes to stderr)."""
    traceback.print_exc(file=sys.stderr)
    return {"error": f"{type(e).__name__}: {e}"[:600]}


def check_nonzero(name: str, t: torch.Tensor) -> None:
    """Benchmarks on all-zero inputs can take fast paths and flatter a kernel: refuse them."""
    if t.numel() and int(torch.count_nonzero(t)) == 0:
        raise RuntimeError(f"benchmark input {name} is all zeros")


def fused_available() -> bool:
    return triton_available()


def arms_for_run() -> dict[str, str | None]:
    """arm -> None when it runs, else why it is skipped."""
    why = None if fused_available() else "Triton unavailable (no CUDA and TRITON_INTERPRET unset)"
    return {"vanilla": None, "naive": None, **{a: why for a in TRITON_ARMS}}
