"""scripts/dev/decode_attn_sweep.py (the static decode step's attention per GQA layout) checks every layout
and backend against the math backend's output before timing it: here on the CPU, where cuDNN's kernels are
absent and their rows carry the error instead of a time."""

import pytest
import torch


def test_every_layout_agrees_and_is_timed(dev_script):
    rows = dev_script("decode_attn_sweep").sweep(2, 200, 1, device="cpu")
    by = {(r["layout"], r["backend"]): r for r in rows}
    assert {lay for lay, _ in by} == {"rows", "heads-gqa", "heads-repeat", "scores"}
    for lay in ("rows", "heads-gqa", "heads-repeat"):
        assert by[(lay, "math")]["ms"] > 0 and by[(lay, "math")]["max_err"] < 1e-2
        assert "ms" not in by[(lay, "cudnn")] and by[(lay, "cudnn")]["error"].startswith("RuntimeError")
    assert by[("scores", "none")]["ms"] > 0 and by[("scores", "none")]["max_err"] < 2e-2


def test_a_wrong_layout_is_reported_not_timed(monkeypatch, dev_script):
    mod = dev_script("decode_attn_sweep")
    real = mod.layouts

    def off(q, k, v, mask):
        fns = real(q, k, v, mask)
        rows = fns["rows"]
        fns["rows"] = lambda be: rows(be) + 1  # a layout that pairs the wrong heads would be off like this
        return fns
    monkeypatch.setattr(mod, "layouts", off)
    bad = [r for r in mod.sweep(1, 150, 1, device="cpu") if r["layout"] == "rows" and r["backend"] == "math"][0]
    assert bad["error"].startswith("differs from the math reference by 1") and "ms" not in bad


@pytest.mark.parametrize("argv", [["--batches", "0"], ["--slots", "a,1"], ["--batches", ""]])
def test_bad_arguments_are_refused(argv, capsys, dev_script):
    assert dev_script("decode_attn_sweep").main(argv) == 2
    assert "positive integers" in capsys.readouterr().err


def test_layouts_pair_query_head_h_with_kv_head_h_over_group(dev_script):
    """enable_gqa and the grouped rows both read KV head h // (H/G) for query head h, as repeat_interleave."""
    mod = dev_script("decode_attn_sweep")
    q, k, v, mask = mod._inputs(1, 64, "cpu")
    fns = mod.layouts(q.float(), k.float(), v.float(), mask)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    want = fns["heads-repeat"](lambda: sdpa_kernel(SDPBackend.MATH))
    for lay in ("rows", "heads-gqa"):
        torch.testing.assert_close(fns[lay](lambda: sdpa_kernel(SDPBackend.MATH)), want, atol=1e-5, rtol=1e-5)
