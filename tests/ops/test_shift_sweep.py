"""scripts/dev/shift_sweep.py (the training op's K+V shift kernels per launch configuration) checks each
configuration's outputs against the default's before timing it: here on the CPU through Triton's interpreter,
tiny shapes. And the launchers' tuning overrides: validated, and without effect on the result."""

import os

import pytest
import torch

needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="the kernels on the CPU need TRITON_INTERPRET=1")


@needs_interpreter
def test_sweep_checks_and_times_each_configuration(dev_script):
    rows = dev_script("shift_sweep").sweep("tiny", (1, 40, 2, 8), 1, device="cpu",
                                           configs=[(None, None), (16, None), (32, 2)])
    for kernel in ("fwd", "bwd"):
        copy, *configs = [r for r in rows if r["kernel"] == kernel]
        assert copy["config"] == "copy of the same bytes" and copy["ms"] > 0
        assert [r["config"] for r in configs] == ["default", '{"block_t": 16}', '{"block_t": 32, "num_warps": 2}']
        for r in configs:
            assert "error" not in r, r
            assert r["ms"] > 0 and r["vs_copy"] == pytest.approx(r["ms"] / copy["ms"])
        assert configs[0]["vs_default"] == 1.0


@needs_interpreter
def test_sweep_reports_a_wrong_configuration_instead_of_timing_it(monkeypatch, dev_script):
    import kvshift.ops.shift.triton as st

    real = st.launch_shift_kv_bwd

    def off(*a, **kw):  # a configuration whose dV is wrong
        dk, dv, dw = real(*a, **kw)
        return (dk, dv + 1, dw) if kw else (dk, dv, dw)
    monkeypatch.setattr(st, "launch_shift_kv_bwd", off)
    rows = dev_script("shift_sweep").sweep("tiny", (1, 40, 2, 8), 1, device="cpu", configs=[(None, None), (16, 2)])
    bad = [r for r in rows if r["kernel"] == "bwd" and r["config"] != "copy of the same bytes"][1]
    assert bad["error"].startswith("output 1 differs from the default's by 1") and "ms" not in bad


@pytest.mark.parametrize("cases", ["162m,nope", "1x2x3", "1x8x2x7", ""])
def test_sweep_refuses_bad_cases(cases, capsys, dev_script):
    assert dev_script("shift_sweep").main(["--cases", cases]) == 2
    assert "--cases takes" in capsys.readouterr().err


def test_kv_launchers_refuse_bad_overrides():
    pytest.importorskip("triton")
    from kvshift.ops.shift.triton import launch_shift_kv_bwd, launch_shift_kv_fwd

    k = torch.zeros(1, 4, 1, 8)
    w = torch.ones(1, 2)
    cs = torch.zeros(1, 4, 4)
    for kw, what in (({"block_t": 24}, "block_t"), ({"block_t": 8}, "block_t"), ({"block_t": True}, "block_t"),
                     ({"num_warps": 3}, "num_warps"), ({"num_warps": True}, "num_warps")):
        with pytest.raises(ValueError, match=what):
            launch_shift_kv_fwd(k, k, w, w, None, cs, cs, **kw)
        with pytest.raises(ValueError, match=what):
            launch_shift_kv_bwd(k, k, k, k, w, w, None, cs, cs, **kw)
