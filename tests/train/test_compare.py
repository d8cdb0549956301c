import json

import pytest

from kvshift.train.compare import compare, tokens_to_reach


def test_tokens_to_reach_interpolates():
    curve = [(10, 3.0), (20, 2.0), (30, 1.0)]
    assert tokens_to_reach(curve, 1.5) == pytest.approx(25.0)
    assert tokens_to_reach(curve, 2.0) == 20.0
    assert tokens_to_reach(curve, 3.5) == 10.0  # already below at the first evaluation
    assert tokens_to_reach(curve, 0.5) is None
    assert tokens_to_reach([(10, 3.0), (20, 1.0), (30, 2.0)], 2.0) == pytest.approx(15.0)  # first crossing


def test_compare_debug(tmp_path):
    out = tmp_path / "cmp"
    logs = []
    res = compare("debug", ["vanilla", "kvshift"], [0, 1], overrides=["train.steps=12", "train.eval_every=3"],
                  out=out, log=logs.append)
    j = json.loads((out / "compare.json").read_text())
    assert j["baseline"] == "vanilla" and j["arms"] == ["vanilla", "kvshift"]
    assert (out / "compare.png").stat().st_size > 1000
    for arm in ("vanilla", "kvshift"):
        for seed in ("0", "1"):
            r = j["runs"][arm][seed]
            assert r["final_val_loss"] > 0 and r["diverged"] is False
            cfg = json.loads((out / f"{arm}-s{seed}" / "config.json").read_text())
            assert cfg["train"]["seed"] == int(seed) and cfg["data"]["seed"] == int(seed)
            assert cfg["model"]["attention"] == arm
    for seed in ("0", "1"):
        ps = j["per_seed"][seed]["kvshift"]
        assert set(ps) == {"diff", "speedup", "baseline_tokens_to_final", "tokens_to_baseline_final"}
        v, k = j["runs"]["vanilla"][seed]["final_val_loss"], j["runs"]["kvshift"][seed]["final_val_loss"]
        assert ps["diff"] == pytest.approx(k - v)
        if ps["tokens_to_baseline_final"] is None:
            assert ps["speedup"] is None and k > v
        else:
            assert ps["speedup"] == pytest.approx(ps["baseline_tokens_to_final"] / ps["tokens_to_baseline_final"])
    agg = j["aggregate"]
    assert agg["vanilla"]["final_val_loss"]["n"] == 2 and agg["vanilla"]["final_val_loss"]["std"] >= 0
    assert {"diff", "speedup", "better_in"} <= set(agg["kvshift"])
    assert res["aggregate"] == agg
    # rerunning continues instead of repeating finished arms
    logs.clear()
    compare("debug", ["vanilla", "kvshift"], [0, 1], overrides=["train.steps=12", "train.eval_every=3"],
            out=out, log=logs.append)
    assert sum("already done" in s for s in logs) == 4


def test_compare_rejects_unknown_arm(tmp_path):
    with pytest.raises(ValueError, match="unknown arms"):
        compare("debug", ["vanilla", "kvshfit"], [0], out=tmp_path)
