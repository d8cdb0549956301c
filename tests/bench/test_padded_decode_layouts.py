"""scripts/dev/padded_decode_layouts.py times padded eager decoding per masked-GQA layout: on a CPU at the
debug size, with the dispatcher's answer widened to the CPU, each layout's rows come back timed and the
dispatcher was really overridden to no for "repeat" (and restored after)."""

import pytest

import kvshift.layers.gqa as gqa


def test_both_layouts_are_timed_and_the_override_is_undone(monkeypatch, dev_script, one_thread):
    mod = dev_script("padded_decode_layouts")
    monkeypatch.setattr(gqa, "NATIVE_DEVICES", ("cpu",))
    monkeypatch.setattr(gqa, "_CHOICES", {})
    real = gqa.cudnn_picked
    monkeypatch.setattr(gqa, "cudnn_picked", lambda q, k, mask: True)  # a CPU "picks cuDNN": the native layout
    forced = gqa.cudnn_picked
    rows = mod.run([(3, 6, True)], 2, device="cpu", model="debug", new_tokens=3, iters=1)
    assert gqa.cudnn_picked is forced and gqa.cudnn_picked is not real
    assert {(r["layout"], r["arm"]) for r in rows} == {(lay, a) for lay in ("repeat", "native") for a in mod.ARMS}
    order = [r["layout"] for r in rows if r["arm"] == mod.ARMS[0]]
    assert order == ["repeat", "native", "native", "repeat"]  # neither layout always first
    for r in rows:
        assert "error" not in r and r["ms_per_token"] > 0 and r["case"] == "b3-p6-padded"
        assert r["native_picked"] == ([False] if r["layout"] == "repeat" else [True])


@pytest.mark.parametrize("argv, msg", [(["--cases", "16-2048"], "--cases"), (["--rounds", "0"], "--rounds")])
def test_bad_arguments_are_refused(argv, msg, capsys, dev_script):
    assert dev_script("padded_decode_layouts").main(argv) == 2
    assert msg in capsys.readouterr().err
