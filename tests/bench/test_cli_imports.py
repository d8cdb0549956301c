"""`kvshift bench` imports the bench modules at its top and sets TRITON_INTERPRET on a CPU machine only when
the command runs: that is correct only while importing them leaves the Triton kernels undefined."""

import os
import subprocess
import sys

CHECK = """
import sys
import kvshift.bench.cli
loaded = [m for m in ("triton", "kvshift.ops.shift.triton", "kvshift.ops.shift.triton_kernels") if m in sys.modules]
assert not loaded, f"importing kvshift.bench.cli imported {loaded}: TRITON_INTERPRET would be set too late"
"""


def test_bench_cli_import_defines_no_triton_kernels():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
