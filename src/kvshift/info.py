"""`kvshift info`: versions, device, attention kinds, fused-kernel availability."""

from __future__ import annotations

import json
import platform

import torch

from kvshift import __version__
from kvshift.models.config import ATTENTION_KINDS, PRESETS, SHIFT_WINDOWS
from kvshift.ops.shift import triton_available


def collect() -> dict:
    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:
            return None

    cuda = torch.cuda.is_available()
    return {
        "kvshift": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "cuda": torch.version.cuda if cuda else None,
        "gpus": torch.cuda.device_count() if cuda else 0,
        "attention_kinds": list(ATTENTION_KINDS),
        "shift_windows": list(SHIFT_WINDOWS),
        "fused_kernels": triton_available(),
        "presets": sorted(PRESETS),
    }


def _run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        if isinstance(v, list):
            v = ", ".join(map(str, v))
        print(f"{k:<{width}}  {v}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="versions, device, attention kinds, fused-kernel availability")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run)
