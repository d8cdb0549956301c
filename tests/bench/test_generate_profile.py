"""`kvshift bench --profile` on the generate part: the kernels of one decode step per case and arm (on a CPU the
aten ops stand in for kernels), profiled generate(N) minus generate(1) per token, in the result and the report;
a failing profile leaves the timing; a merge keeps the profiles of a case's arms."""

import json
import math

import pytest
import torch

import kvshift.bench.generate as gen_mod
import kvshift.bench.profile as prof_mod
from kvshift.bench.generate import PROFILE_NEW_TOKENS, bench_generate
from kvshift.bench.plan import Plan
from kvshift.bench.profile import GRAPH_INVISIBLE, family, profile_decode
from kvshift.bench.report import render_markdown

ARMS = ["lm-vanilla", "lm-kvshift", "hf-kvshift-static"]
HEADING = "## GPU kernels of one decode step"


def _plan(profile: bool = True, arms=ARMS) -> Plan:
    plan = Plan.quick_plan(False)
    plan.gen_cases, plan.gen_new_tokens, plan.gen_iters, plan.gen_warmup = [(1, 5)], 4, 1, 1
    plan.gen_arms, plan.profile = list(arms), profile
    return plan


def _md(sec: dict) -> str:
    return render_markdown({"meta": {"device": "cpu", "quick": True}, "generate": sec})


def test_generate_profile_records_the_kernels_of_one_decode_step(one_thread):
    sec = bench_generate(_plan(), torch.device("cpu"), lambda u: None)
    assert "profile" in sec["settings"]
    case = sec["cases"]["b1-p5"]
    for arm in ARMS:
        r = case["arms"][arm]
        assert "error" not in r and r["ms_per_token"] > 0, (arm, r)
        p = r["profile"]
        assert "error" not in p, (arm, p)
        assert p["new_tokens"] == min(4, PROFILE_NEW_TOKENS) and "prefill excluded" in p["method"]
        # the time is a difference of two profiled calls: on a busy CPU its sign is noise (on a GPU, kernel time)
        assert math.isfinite(p["ms_per_token"]) and p["kernels_per_token"] > 0
        assert sum(p["families_ms_per_token"].values()) == pytest.approx(p["ms_per_token"], abs=1e-5)
        assert set(p["families_ms_per_token"]) <= {"attention", "matmul", "triton/elementwise", "other"}
        assert 0 < len(p["top"]) <= 8 and all(t["calls_per_token"] > 0 for t in p["top"])
        assert [t["ms_per_token"] for t in p["top"]] == sorted((t["ms_per_token"] for t in p["top"]), reverse=True)
        assert "launches_per_token" not in p  # host launches: CUDA only
    md = _md(sec)
    assert HEADING in md and md.index("## Decoding through generate") < md.index(HEADING)
    assert "| b1-p5 | lm-kvshift |" in md.split(HEADING)[1] and "prefill" in md.split(HEADING)[1]


def test_a_failing_profile_leaves_the_timing(one_thread, monkeypatch):
    def boom(*a, **kw):
        raise RuntimeError("profiler exploded")

    monkeypatch.setattr(gen_mod, "profile_decode", boom)
    sec = bench_generate(_plan(arms=["lm-vanilla"]), torch.device("cpu"), lambda u: None)
    r = sec["cases"]["b1-p5"]["arms"]["lm-vanilla"]
    assert r["ms_per_token"] > 0 and r["generate_ms"]["median_ms"] > 0 and "error" not in r
    assert "profiler exploded" in r["profile"]["error"]
    md = _md(sec)
    assert "profile error" in md and "| 1 | 5 |" in md  # the timing row stands
    assert "## Errors" not in md  # a failed profile is no failed arm


def test_no_profile_no_section(one_thread):
    sec = bench_generate(_plan(profile=False, arms=["lm-vanilla"]), torch.device("cpu"), lambda u: None)
    assert "profile" not in sec["cases"]["b1-p5"]["arms"]["lm-vanilla"] and "profile" not in sec["settings"]
    assert HEADING not in _md(sec)


def test_profile_decode_takes_the_difference_per_token():
    """A fake generate: one prefill op, then k matmuls; only the matmul is per token, once."""
    a = torch.randn(16, 16)

    def call(ids, k):
        ids.float().cumsum(1)  # the prefill: as often in both calls, left out
        for _ in range(k):
            torch.mm(a, a)
        return ids

    p = profile_decode(call, torch.ones(1, 3, dtype=torch.long), 5, torch.device("cpu"))
    names = [t["kernel"] for t in p["top"]]
    # by name, not rank: on a busy CPU an op mm calls (resolve_conj) can outlast it
    mm = next(t for t in p["top"] if t["kernel"] == "aten::mm")
    assert mm["calls_per_token"] == 1 and "aten::cumsum" not in names
    assert p["kernels_per_token"] == sum(t["calls_per_token"] for t in p["top"])  # mm and the ops it calls
    assert p["families_ms_per_token"]["matmul"] == pytest.approx(mm["ms_per_token"])
    with pytest.raises(ValueError, match=">= 2"):
        profile_decode(call, torch.ones(1, 3, dtype=torch.long), 1, torch.device("cpu"))
    assert family("aten::mm") == "matmul" and family("sm90_xmma_gemm_bf16") == "matmul"
    assert family("flash_fwd_splitkv_kernel") == "attention" and family("aten::mul") == "other"


def test_cuda_graph_kernels_not_seen_are_said_so(monkeypatch):
    """Under CUDA graphs: host launches and graph replays per token; no kernel seen -> said, not invented."""
    def fake(call, ids, k, device):
        return {}, {"cudaGraphLaunch": k, "cudaLaunchKernel": 7 + 2 * k}

    monkeypatch.setattr(prof_mod, "_profile_call", fake)
    p = profile_decode(None, None, 9, torch.device("cuda"))
    assert p["kernels_per_token"] == 0 and p["graph_launches_per_token"] == 1 and p["launches_per_token"] == 2
    assert p["note"] == GRAPH_INVISIBLE
    case = {"batch": 1, "prompt": 8, "ratios": {}, "arms": {"lm-kvshift-compiled": {"ms_per_token": 1.0,
                                                                                     "profile": p}}}
    md = _md({"cases": {"b1-p8": case}})
    assert "not visible" in md and "| 2 (1) |" in md

    def seen(call, ids, k, device):
        return {"gemv": (3 * k + 4, 0.01 * k)}, {"cudaGraphLaunch": k}
    monkeypatch.setattr(prof_mod, "_profile_call", seen)
    p = profile_decode(None, None, 9, torch.device("cuda"))
    assert p["kernels_per_token"] == 3 and p["ms_per_token"] == pytest.approx(0.01) and "note" not in p


def test_merge_keeps_the_profiles_of_a_cases_arms(tmp_path):
    from kvshift.bench.run import merge_results

    meta = {"device": "X", "device_slug": "x", "quick": False}

    def prof(ms):
        return {"new_tokens": 9, "kernels": "gpu kernels (device time)", "ms_per_token": ms, "kernels_per_token": 90,
                "launches_per_token": 0, "graph_launches_per_token": 1,
                "families_ms_per_token": {"matmul": ms}, "top": [{"kernel": "gemv", "calls_per_token": 30,
                                                                   "ms_per_token": ms}]}

    paths = []
    for i, arms in enumerate(({"lm-vanilla": 10.0, "lm-kvshift": 11.0},
                              {"lm-vanilla-compiled": 5.0, "lm-kvshift-compiled": 5.2})):
        run = {"meta": meta, "generate": {"settings": {}, "cases": {"b1-p8": {
            "batch": 1, "prompt": 8, "ratios": {},
            "arms": {a: {"ms_per_token": ms, "profile": prof(ms / 2)} for a, ms in arms.items()}}}}}
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(run))
    res = merge_results(paths, tmp_path / "out")
    arms = res["generate"]["cases"]["b1-p8"]["arms"]
    assert len(arms) == 4 and all(a["profile"]["ms_per_token"] == a["ms_per_token"] / 2 for a in arms.values())
    md = (tmp_path / "out" / "x.md").read_text()
    assert HEADING in md and all(f"| b1-p8 | {a} |" in md for a in arms)
