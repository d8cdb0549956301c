"""scripts/dev/decode_sweep.py (the stateless decode kernel's launch configurations against SDPA) checks each
configuration's output before timing it: here on the CPU through Triton's interpreter, tiny shapes."""

import os

import pytest


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the kernel on the CPU needs TRITON_INTERPRET=1")
def test_sweep_checks_and_times_each_configuration(dev_script):
    rows = dev_script("decode_sweep").sweep(2, 40, 1, device="cpu",
                                            configs=[(16, "auto", 4, None), (16, "1", 4, None), (32, "3", 2, 2)])
    base, *configs = rows
    assert base["ratio"] == 1.0 and base["ms"] > 0
    assert len(configs) == 2  # "auto" is 1 off CUDA: the same configuration once
    for r in configs:
        assert "error" not in r, r
        assert r["max_err"] < 2e-2 and r["ms"] > 0 and r["ratio"] == pytest.approx(r["ms"] / base["ms"])


@pytest.mark.parametrize("cases", ["16by2048", "16x0", "16x2048x3", ""])
def test_sweep_refuses_bad_cases(cases, capsys, dev_script):
    assert dev_script("decode_sweep").main(["--cases", cases]) == 2
    assert "--cases must look like" in capsys.readouterr().err


def test_sweep_wrong_output_is_reported_not_timed(monkeypatch, dev_script):
    mod = dev_script("decode_sweep")
    import kvshift.ops.shift.paged_decode as pd

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernel on the CPU needs TRITON_INTERPRET=1")
    real = pd.dense_shift_decode
    monkeypatch.setattr(pd, "dense_shift_decode", lambda *a, **k: real(*a, **k) + 1)
    rows = mod.sweep(2, 40, 1, device="cpu", configs=[(16, "1", 4, None)])
    assert rows[1]["error"].startswith("max error")
