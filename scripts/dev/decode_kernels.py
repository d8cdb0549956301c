"""How many kernels the compiled decode step (`LM.generate(compile=True)`) makes, per attention kind, on a CPU.

    python scripts/dev/decode_kernels.py [KIND ...]          # default: vanilla kvshift

On the GPU every kernel of the step is a launch inside its CUDA graph, so a shift that inductor does not fuse
shows up as kernels per token (`kvshift bench --only generate --profile`). This counts them without a GPU:
inductor compiles the step of a small bf16 model for the CPU with its GPU code generator's rules (Triton
scheduling, and the pointwise concatenation the CPU backend turns off), and the fused kernels are read from
the post-fusion IR log (TORCH_LOGS=ir_post_fusion). The Triton code itself cannot be built without a GPU, so
each compile ends in an error after the log is written; that is expected. A diagnostic: what inductor fuses
differs between torch versions, so check a finding with the profile on the GPU (docs/serving.md).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

CHILD = r"""
import sys, torch
import torch._inductor.config as ic
ic.cpu_backend = "triton"
ic.force_pointwise_cat = True
from kvshift.models import LM
from kvshift.models.config import ModelConfig
m = LM(ModelConfig(vocab_size=256, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, attention=sys.argv[1]))
m = m.to(torch.bfloat16).eval()
m.generate(torch.randint(0, 256, (1, 16)), max_new_tokens=2, compile=True)
"""


def kernels(log: str) -> int:
    """Fused kernels of the first graph in an ir_post_fusion log: each FusedSchedulerNode, and each
    SchedulerNode that is not part of one (extern kernels such as matmuls and no-op nodes are not counted)."""
    nodes = {}
    for line in log.splitlines():
        m = re.search(r"\[__ir_post_fusion\] (op\w+): (\w+)\(", line)
        if m:
            nodes.setdefault(m.group(1), m.group(2))
    fused = [n for n, t in nodes.items() if t == "FusedSchedulerNode"]
    inside = {part for n in fused for part in n.split("_")}
    return len(fused) + sum(1 for n, t in nodes.items() if t == "SchedulerNode" and n not in inside)


def count(kind: str) -> int:
    env = dict(os.environ, TORCH_LOGS="ir_post_fusion", TRITON_INTERPRET="1")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, "-c", CHILD, kind], env=env, capture_output=True, text=True, timeout=900)
    n = kernels(r.stderr + r.stdout)
    if n == 0:
        raise RuntimeError(f"no post-fusion IR for attention={kind!r}; its output ends:\n{r.stderr[-2000:]}")
    return n


def main(argv: list[str]) -> None:
    for kind in argv or ["vanilla", "kvshift"]:
        print(f"{kind}: {count(kind)} kernels per decode step (2 layers)")


if __name__ == "__main__":
    main(sys.argv[1:])
