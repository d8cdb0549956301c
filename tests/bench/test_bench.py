"""`kvshift bench`: the quick plan end to end on CPU, the result/markdown structure, the target
arithmetic (made-up numbers, met and missed) and the never-zero inputs."""

import json
import re
import math

import pytest
import torch

from kvshift.bench.block import block_inputs
from kvshift.bench.decode import decode_prompt
from kvshift.bench.e2e import train_batch
from kvshift.bench.plan import PARTS, check_nonzero, device_slug, fused_available
from kvshift.bench.report import ARMS, ATTN_ARMS, TARGETS, check_target, compute_targets, render_markdown, target_summary
from kvshift.bench.run import kept_part, merge_results
from kvshift.bench.timing import measure, percentile, summarize
from kvshift.cli import main
from kvshift.models import ModelConfig


def _check_timing(t: dict, n: int) -> None:
    assert t["n"] == n and len(t["times_ms"]) == n
    assert 0 < t["p10_ms"] <= t["median_ms"] <= t["p90_ms"]


def _check_arms(case: dict, n: int) -> None:
    assert tuple(case["arms"]) == ARMS
    for arm in ARMS:
        a = case["arms"][arm]
        if arm in ("fused", "fused-sdpa", "fused-flash") and not fused_available():
            assert "skipped" in a
            continue
        if arm in ("fused-sdpa", "fused-flash") and "skipped" in a:
            assert "same kernel" in a["skipped"]  # decode: one decode step for both Triton arms
            continue
        assert "error" not in a, a
        _check_timing(a.get("step", a), n)


def test_quick_run_end_to_end(tmp_path, one_thread, capsys):
    out = tmp_path / "bench"
    # the default parts (attn, generate, e2e), then the superseded block and decode on their own
    assert main(["bench", "--quick", "--out", str(out), "--steps", "2", "--warmup", "1", "--profile",
                 "--gen-iters", "1", "--new-tokens", "3", "--gen-cases", "2x8"]) == 0
    printed = capsys.readouterr().out
    assert "## Targets" in printed and "cpu.json" in printed
    first = json.loads((out / "cpu.json").read_text())
    assert set(first) >= {"attn", "generate", "e2e"} and not set(first) & {"block", "decode"}
    assert list(first["generate"]["cases"]) == ["b2-p8"] and first["generate"]["new_tokens"] == 3
    for name, c in first["attn"]["shapes"].items():
        assert c["family"] in ("flash", "math") and tuple(c["arms"]) == ATTN_ARMS, name
        for arm, a in c["arms"].items():
            if "skipped" in a:
                assert not fused_available()
                continue
            assert "error" not in a, (name, arm, a)
            _check_timing(a["sync"], 2)
            assert a["b2b"]["n"] == 2 and "kernels" in a  # --profile: the profiler also runs on a CPU
    assert main(["bench", "--quick", "--only", "block,decode", "--out", str(out), "--steps", "2", "--warmup", "1"]) == 0
    res = json.loads((out / "cpu.json").read_text())
    md = (out / "cpu.md").read_text()

    meta = res["meta"]
    assert meta["device"] == "cpu" and meta["device_slug"] == "cpu" and meta["quick"] is True
    assert meta["torch"] == torch.__version__ and "git_commit" in meta and meta["plan"]["block_iters"] == 2

    assert set(PARTS) <= set(res)
    for part in ("attn", "generate", "e2e"):  # kept from the first run
        assert res[part]["from_earlier_run"] is True
        assert {k: v for k, v in res[part].items() if k not in ("from_earlier_run", "measured_by")} == first[part]
        assert res[part]["measured_by"] == {k: first["meta"][k] for k in ("command", "time_utc", "git_commit")}
    blk = res["block"]
    assert blk["settings"]["iters"] == 2 and blk["settings"]["timer"] == "perf_counter"
    assert len(blk["shapes"]) == 2
    for name, s in blk["shapes"].items():
        assert s["sdpa_backend"] in ("flash", "flash-expand", "default")
        _check_arms(s, 2)
        assert s["ratios"]["naive"] > 0
    assert any(s["H_kv"] < s["H"] for s in blk["shapes"].values())  # a GQA shape is covered

    e2e = res["e2e"]
    assert list(e2e["models"]) == ["debug", "debug-mha"]
    for name, m in e2e["models"].items():
        _check_arms(m, 2)
        cfg = ModelConfig.from_name(m["preset"], **m["overrides"])
        for arm in ("vanilla", "naive"):
            a = m["arms"][arm]
            assert a["tokens_per_s"] == pytest.approx(m["batch"] * m["seq_len"] / (a["step"]["median_ms"] / 1e3))
            assert a["mfu"] == pytest.approx(a["tokens_per_s"] * a["flops_per_token"] / e2e["settings"]["peak_flops"])
            assert a["peak_mem_bytes"] is None  # no CUDA allocator on CPU
            assert a["loss"] is not None and math.isclose(a["loss"], math.log(cfg.vocab_size), rel_tol=0.2)
        assert set(m["ratios"]) == {"tokens_per_s", "peak_mem"}
        prof = m["arms"]["vanilla"]["profile"]
        assert "error" not in prof and prof["steps"] == 2 and isinstance(prof["top"], list)
        host = prof["host"]  # on a CPU: no launches, no GPU to wait for, the aten ops' host time
        assert host["launches_per_step"] == 0 and host["syncs_per_step"] == {} and host["self_cpu_ms_per_step"] > 0
        assert host["top"] and all(t["self_cpu_ms_per_step"] >= 0 for t in host["top"])

    dec = res["decode"]
    assert dec["context"] == 40 and list(dec["batches"]) == ["batch1", "batch2"]
    for b in dec["batches"].values():
        _check_arms(b, 2)
        assert b["arms"]["vanilla"]["tokens_per_s"] > 0

    tg = res["targets"]
    # the superseded block and decode parts set no target; attn and generate (from the first run) do
    expect = {f"attn/{n}/time_ratio" for n in res["attn"]["shapes"]}
    expect |= {f"generate/b2-p8/{r}_ratio" for r in ("lm", "hf-static-vs-llama")}  # no compiled arm on a CPU
    for n in e2e["models"]:
        expect |= {f"e2e/{n}/tokens_per_s_ratio", f"e2e/{n}/peak_mem_ratio"}
    assert set(tg) == expect  # no MFU target: it is stated for bench-246m only
    for t in tg.values():
        assert set(t) == {"what", "measured", "op", "target", "met", "margin", "margin_pct"}
    assert tg["e2e/debug/peak_mem_ratio"]["met"] is None  # no memory numbers on CPU
    assert res["summary"]["met"] + res["summary"]["missed"] + res["summary"]["unknown"] == len(tg)

    for heading in ("Quick mode", "## Attention block as a model runs it", "## Decoding through generate",
                    "## Superseded: attention block", "## End-to-end training step", "## Superseded: decode",
                    "## Targets"):
        assert heading in md, heading


def test_only_rejects_unknown_parts(capsys):
    assert main(["bench", "--quick", "--only", "block,kernels"]) == 2  # a user mistake: one line, exit 2
    assert "--only" in capsys.readouterr().err


# ---- targets: a pure function of the result -----------------------------------------------------
def test_check_target_met_and_missed():
    t = check_target(1.05, "<=", 1.03)
    assert t["met"] is False and t["margin"] == pytest.approx(-0.02) and t["margin_pct"] == pytest.approx(-100 * 0.02 / 1.03)
    t = check_target(1.01, "<=", 1.03)
    assert t["met"] is True and t["margin"] == pytest.approx(0.02)
    t = check_target(0.98, ">=", 0.99)
    assert t["met"] is False and t["margin"] == pytest.approx(-0.01)
    t = check_target(0.995, ">=", 0.99)
    assert t["met"] is True and t["margin"] == pytest.approx(0.005)
    assert check_target(1.03, "<=", 1.03)["met"] is True  # the bound itself meets the target
    t = check_target(None, "<=", 1.03)
    assert t["met"] is None and t["margin"] is None
    with pytest.raises(ValueError, match="op"):
        check_target(1.0, "<", 1.03)


def _made_up_results() -> dict:
    def arm(ms=None, **kw):
        return {"median_ms": ms, "p10_ms": ms, "p90_ms": ms, **kw}

    return {
        "meta": {"device": "NVIDIA H200", "device_slug": "nvidia-h200", "quick": False},
        "block": {"settings": {}, "shapes": {
            "B8-T2048-H16-D128": {"B": 8, "T": 2048, "H": 16, "H_kv": 16, "D": 128, "sdpa_backend": "flash",
                                  "arms": {"vanilla": arm(10.0), "naive": arm(13.0), "fused": arm(11.0)},
                                  "ratios": {"naive": 1.3, "fused": 1.10}}}},
        "e2e": {"settings": {"peak_flops": 989e12}, "models": {
            "bench-162m": {"batch": 32, "seq_len": 1024, "arms": {
                "vanilla": {"tokens_per_s": 1e6, "mfu": 0.5, "peak_mem_bytes": 100, "step": arm(1.0)},
                "fused": {"tokens_per_s": 0.995e6, "mfu": 0.4975, "peak_mem_bytes": 100, "step": arm(1.0)},
                "naive": {"error": "OutOfMemoryError: made up"}},
                "ratios": {"tokens_per_s": {"naive": None, "fused": 0.995}, "peak_mem": {"naive": None, "fused": 1.00}}},
            "bench-246m": {"batch": 16, "seq_len": 2048, "arms": {
                "vanilla": {"tokens_per_s": 1e6, "mfu": 0.41, "peak_mem_bytes": 100, "step": arm(1.0)},
                "fused": {"tokens_per_s": 0.98e6, "mfu": 0.40, "peak_mem_bytes": 103, "step": arm(1.0)}},
                "ratios": {"tokens_per_s": {"fused": 0.98}, "peak_mem": {"fused": 1.03}}}}},
        "attn": {"settings": {}, "shapes": {"B8-T2048-H16-D128-cudnn-eager": {
            "B": 8, "T": 2048, "H": 16, "H_kv": 16, "D": 128, "family": "cudnn", "mode": "eager", "gqa": "native",
            "arms": {"vanilla": {"b2b": arm(10.0)}, "fused": {"b2b": arm(11.0)}},
            "ratios": {"b2b": {"fused": 1.10}}}}},
        "generate": {"model": "bench-246m", "new_tokens": 128, "settings": {}, "cases": {"b16-p2048": {
            "batch": 16, "prompt": 2048, "arms": {"lm-vanilla": {"ms_per_token": 10.0}, "lm-kvshift": {"ms_per_token": 10.1}},
            "ratios": {"lm": 1.01}}}},
        "decode": {"model": "bench-246m", "context": 8192, "settings": {}, "batches": {
            "batch1": {"batch": 1, "arms": {"vanilla": arm(5.0), "fused": arm(5.05)}, "ratios": {"fused": 1.01}}}},
    }


def test_compute_targets_with_made_up_numbers():
    res = _made_up_results()
    tg = compute_targets(res)
    assert set(tg) == {"attn/B8-T2048-H16-D128-cudnn-eager/time_ratio", "e2e/bench-162m/tokens_per_s_ratio",
                       "e2e/bench-162m/peak_mem_ratio", "e2e/bench-246m/tokens_per_s_ratio",
                       "e2e/bench-246m/peak_mem_ratio", "e2e/bench-246m/mfu", "generate/b16-p2048/lm_ratio"}
    blk = tg["attn/B8-T2048-H16-D128-cudnn-eager/time_ratio"]
    assert (blk["met"], blk["target"], blk["op"]) == (False, TARGETS["block_time"][2], "<=")
    assert blk["margin"] == pytest.approx(1.03 - 1.10)  # missed by 0.07
    assert tg["e2e/bench-162m/tokens_per_s_ratio"]["met"] is True
    assert tg["e2e/bench-162m/tokens_per_s_ratio"]["margin"] == pytest.approx(0.995 - TARGETS["e2e_tokens_per_s"][2])
    assert tg["e2e/bench-162m/peak_mem_ratio"]["met"] is True
    assert tg["e2e/bench-246m/tokens_per_s_ratio"]["margin"] == pytest.approx(0.98 - TARGETS["e2e_tokens_per_s"][2])
    assert tg["e2e/bench-246m/peak_mem_ratio"]["margin"] == pytest.approx(TARGETS["e2e_peak_mem"][2] - 1.03)
    mfu = tg["e2e/bench-246m/mfu"]
    assert mfu["met"] is False and mfu["measured"] == 0.40 and mfu["margin"] == pytest.approx(-0.05)
    assert tg["generate/b16-p2048/lm_ratio"]["met"] is True

    summ = target_summary(tg)
    assert (summ["met"], summ["missed"], summ["unknown"]) == (3, 4, 0)
    assert summ["missed_targets"] == ["attn/B8-T2048-H16-D128-cudnn-eager/time_ratio", "e2e/bench-246m/tokens_per_s_ratio",
                                      "e2e/bench-246m/peak_mem_ratio", "e2e/bench-246m/mfu"]
    res["targets"] = tg
    md = render_markdown(res)
    assert "| attn/B8-T2048-H16-D128-cudnn-eager/time_ratio | 1.1000 | <= 1.03 | **NO** | -0.0700 (-6.80%) |" in md
    assert "## Superseded: attention block" in md and "## Superseded: decode" in md
    assert "## Errors" in md and "OutOfMemoryError: made up" in md
    assert "Quick mode" not in md


def test_missing_arm_gives_unknown_target():
    res = _made_up_results()
    del res["e2e"]["models"]["bench-246m"]["arms"]["fused"]
    res["e2e"]["models"]["bench-246m"]["ratios"] = {"tokens_per_s": {"fused": None}, "peak_mem": {"fused": None}}
    tg = compute_targets(res)
    assert tg["e2e/bench-246m/mfu"]["met"] is None and tg["e2e/bench-246m/tokens_per_s_ratio"]["met"] is None
    assert target_summary(tg)["unknown"] == 3


# ---- inputs and timing --------------------------------------------------------------------------
def test_inputs_are_never_zero():
    inp = block_inputs(2, 33, 4, 2, 16, device="cpu", seed=3)
    for name in ("q", "k", "v", "grad_out", "w_k", "w_v"):
        t = inp[name]
        assert int(torch.count_nonzero(t)) == t.numel(), name
    assert inp["q"].dtype == torch.bfloat16 and inp["k"].shape == (2, 33, 2, 16) and inp["grad_out"].shape == (2, 4, 33, 16)
    assert torch.allclose(inp["w_k"].sum(1), torch.ones(2))  # the paper's init: taps sum to 1
    cfg = ModelConfig.from_name("debug")
    x, y = train_batch(cfg, 3, 17, device="cpu")
    assert x.shape == y.shape == (3, 17) and int(x.min()) >= 1 and int(y.min()) >= 1
    assert torch.equal(x[:, 1:], y[:, :-1])
    p = decode_prompt(cfg.vocab_size, 2, 9, device="cpu")
    assert p.shape == (2, 9) and int(p.min()) >= 1 and int(p.max()) < cfg.vocab_size
    with pytest.raises(RuntimeError, match="all zeros"):
        check_nonzero("x", torch.zeros(4))


def test_percentile_and_summary():
    v = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(v, 50) == 3.0 and percentile(v, 0) == 1.0 and percentile(v, 100) == 5.0
    assert percentile(v, 10) == pytest.approx(1.4) and percentile(v, 90) == pytest.approx(4.6)
    s = summarize(v)
    assert (s["median_ms"], s["n"], s["mean_ms"]) == (3.0, 5, 3.0)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_measure_interleaves_arms():
    calls = []
    fns = {a: (lambda a=a: calls.append(a)) for a in ("x", "y", "z")}
    res = measure(fns, warmup=1, iters=3, device=torch.device("cpu"))
    assert calls[:3] == ["x", "y", "z"]  # warm-up
    assert calls[3:] == ["x", "y", "z", "y", "z", "x", "z", "x", "y"]  # order rotates every round
    assert all(r["n"] == 3 for r in res.values())
    with pytest.raises(ValueError, match="iters"):
        measure(fns, warmup=0, iters=0, device=torch.device("cpu"))


def test_device_slug():
    assert device_slug("NVIDIA H200") == "nvidia-h200"
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert device_slug("cpu") == "cpu"


def test_merge_takes_each_part_from_its_run(tmp_path):
    base = {"meta": {"device": "X", "device_slug": "x", "quick": False, "command": "a"}}
    a = {**base, "block": {"shapes": {}, "settings": {}}, "decode": {"batches": {}, "settings": {}},
         "e2e": {"models": {"old": {}}, "from_earlier_run": True}}
    b = {**base, "meta": {**base["meta"], "command": "b"}, "e2e": {"models": {"new": {"arms": {}, "ratios": {}}},
                                                                   "settings": {}}}
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    pc = tmp_path / "c.json"
    pc.write_text(json.dumps({**b, "e2e": {"models": {"other": {"arms": {}, "ratios": {}}}, "settings": {}}}))
    res = merge_results([pa, pb, pc], tmp_path / "out")
    assert list(res["e2e"]["models"]) == ["new", "other"] and "block" in res and "decode" in res
    assert [m["parts"] for m in res["meta"]["merged_from"]] == [["block", "decode"], ["e2e"], ["e2e"]]
    assert (tmp_path / "out" / "x.json").exists() and (tmp_path / "out" / "x.md").exists()
    md = (tmp_path / "out" / "x.md").read_text()
    assert "- a.json: block, decode at" in md and "- c.json: e2e at" in md  # which run measured what
    # a part kept from an earlier run into the same --out names that run (measured_by) and is merged as its own
    d = {**b, "meta": {**b["meta"], "command": "d", "time_utc": "t2"},
         "decode": {"batches": {}, "settings": {}, "marker": 1, "from_earlier_run": True,
                   "measured_by": {"command": "early", "time_utc": "t1", "git_commit": "g"}}}
    pd = tmp_path / "d.json"
    pd.write_text(json.dumps(d))
    res = merge_results([pa, pd], tmp_path / "out")
    assert [(m["command"], m["parts"]) for m in res["meta"]["merged_from"]] == \
        [("a", ["block", "decode"]), ("early", ["decode"]), ("d", ["e2e"])]
    assert res["decode"]["marker"] == 1 and "from_earlier_run" not in res["decode"]
    assert "measured_by" not in res["decode"] and "from_earlier_run" not in res["e2e"]
    # the run that measured the kept part is merged too: its own copy stands, the kept one is not listed twice
    a2 = {**a, "meta": {**a["meta"], "command": "early", "time_utc": "t1", "git_commit": "g"},
          "decode": {"batches": {}, "settings": {}, "marker": 2}}
    pa2 = tmp_path / "a2.json"
    pa2.write_text(json.dumps(a2))
    res = merge_results([pa2, pb, pd], tmp_path / "out")
    assert [m["command"] for m in res["meta"]["merged_from"]].count("early") == 1 and res["decode"]["marker"] == 2
    # kept from a merged file: the runs that hold the part, a list; a third run keeps what the second recorded
    merged_meta = {"merged_from": [{"command": "x", "time_utc": "1", "git_commit": "g", "parts": ["e2e"]},
                                   {"command": "y", "time_utc": "2", "git_commit": "g", "parts": ["e2e", "block"]}]}
    k = kept_part("e2e", {"models": {}}, merged_meta)
    assert k["from_earlier_run"] and [m["command"] for m in k["measured_by"]] == ["x", "y"]
    assert kept_part("e2e", k, {"command": "z"})["measured_by"] == k["measured_by"]
    assert kept_part("e2e", {"models": {}}, {"command": "z", "time_utc": "3"})["measured_by"]["command"] == "z"
    assert "measured_by" not in kept_part("e2e", {"models": {}, "from_earlier_run": True}, {"command": "z"})
    pk = tmp_path / "k.json"
    pk.write_text(json.dumps({**b, "meta": {**b["meta"], "command": "k"}, "block": k | {"shapes": {}, "settings": {}}}))
    res = merge_results([pb, pk], tmp_path / "out")
    assert [(m["command"], m["parts"]) for m in res["meta"]["merged_from"]] == \
        [("b", ["e2e"]), ("x", ["block"]), ("y", ["block"]), ("k", ["e2e"])]
    # one file alone: written again as it is (its sources, parts and cases), the markdown from the current report
    again = merge_results([tmp_path / "out" / "x.json"], tmp_path / "again")
    assert again["meta"]["merged_from"] == res["meta"]["merged_from"] and again["e2e"] == res["e2e"]
    with pytest.raises(ValueError, match="at least one"):
        merge_results([], tmp_path / "out")
    pb.write_text(json.dumps({**b, "meta": {**b["meta"], "device": "Y"}}))
    with pytest.raises(ValueError, match="different devices"):
        merge_results([pa, pb], tmp_path / "out")


def test_e2e_measures_the_mixers_beside_vanilla(tmp_path, one_thread):
    """--e2e-arms: the short mixers (on their fused kernels where Triton runs) train in the e2e part, with their
    tokens/s and memory ratios against vanilla and rows in the table; an unknown arm is refused."""
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--only", "e2e", "--models", "debug", "--e2e-arms", "vanilla,dconv,smear",
                 "--out", str(out), "--steps", "1", "--warmup", "1"]) == 0
    m = json.loads((out / "cpu.json").read_text())["e2e"]["models"]["debug"]
    assert list(m["arms"]) == ["vanilla", "dconv", "smear"]
    for arm in ("dconv", "smear"):
        a = m["arms"][arm]
        if not fused_available():
            assert "skipped" in a
            continue
        assert "error" not in a, a
        assert m["ratios"]["tokens_per_s"][arm] == pytest.approx(a["tokens_per_s"] / m["arms"]["vanilla"]["tokens_per_s"])
    md = (out / "cpu.md").read_text()
    assert (re.search(r"\| debug \(B 2, T 32, [0-9.]+M params\) \| dconv \|", md) if fused_available()
            else "| debug | dconv | skipped |" in md)
    assert main(["bench", "--quick", "--only", "e2e", "--e2e-arms", "vanilla,conv"]) == 2


# ---- e2e: packed documents and the cases beyond the default plan ------------------------------------
def test_packed_rows_follow_the_corpus_length_distribution():
    from kvshift.bench.e2e import document_lengths, packed_positions

    q = document_lengths()["quantiles"]
    assert len(q) == 201 and q == sorted(q) and q[0] >= 1
    pos, docs = packed_positions(64, 4096, seed=3)
    assert pos.shape == (64, 4096) and all(sum(r) == 4096 for r in docs)
    for b, row in enumerate(docs):  # position 0 at each document start, counting up inside it
        starts = [0] + list(torch.tensor(row).cumsum(0)[:-1].tolist())
        assert torch.nonzero(pos[b] == 0).flatten().tolist() == starts
        assert all(int(pos[b, s + n - 1]) == n - 1 for s, n in zip(starts, row))
    lens = [n for r in docs for n in r[:-1]]  # the last document of a row is cut by the row's end
    med = sorted(lens)[len(lens) // 2]  # (whole documents only: a long one is more often the cut last one)
    assert q[60] <= med <= q[100]  # drawn from the distribution: the median lies near its median
    again, _ = packed_positions(64, 4096, seed=3)
    assert torch.equal(pos, again)


def test_e2e_packed_case_runs_and_is_reported(tmp_path, one_thread):
    """`--models` selects the cases beyond the default plan; the packed one feeds position ids restarting at
    every document to the compiled step, and the report says how many documents a row holds."""
    from kvshift.cli import main

    out = tmp_path / "b"
    assert main(["bench", "--quick", "--only", "e2e", "--e2e-arms", "vanilla,naive", "--models", "debug-packed",
                 "--out", str(out)]) == 0
    res = json.loads(next(out.glob("*.json")).read_text())
    m = res["e2e"]["models"]["debug-packed"]
    assert m["layout"] == "packed" and m["documents_per_row"] >= 1 and m["params"] > 0
    for arm in ("vanilla", "naive"):
        assert "error" not in m["arms"][arm] and m["arms"][arm]["loss"] is not None
    assert "packed:" in next(out.glob("*.md")).read_text()
    assert main(["bench", "--quick", "--only", "e2e", "--models", "bench-1b", "--out", str(out)]) == 2


def test_the_larger_e2e_cases_are_what_the_issue_names():
    from kvshift.bench.e2e import n_params
    from kvshift.bench.plan import E2E_MORE

    preset, over, T, B, layout = E2E_MORE["bench-1b"]
    assert 0.9e9 < n_params(ModelConfig.from_name(preset, **over)) < 1.2e9 and T == 4096
    assert E2E_MORE["bench-246m-16k"][2] == 16384 and E2E_MORE["bench-162m-packed"][4] == "packed"


def test_host_summary_counts_launches_and_syncs_per_step():
    from types import SimpleNamespace as E

    from kvshift.bench.profile import host_summary
    from kvshift.bench.report import _host_cell

    events = [E(key="cudaLaunchKernel", count=40, self_cpu_time_total=400.0),
              E(key="cudaStreamSynchronize", count=6, self_cpu_time_total=3000.0),
              E(key="aten::mm", count=8, self_cpu_time_total=100.0), E(key="idle", count=1, self_cpu_time_total=0.0)]
    h = host_summary(SimpleProf(events), steps=2)
    assert h["launches_per_step"] == 20 and h["syncs_per_step"] == {"cudaStreamSynchronize": 3}
    assert h["self_cpu_ms_per_step"] == pytest.approx(1.75) and [t["event"] for t in h["top"]][0] == "cudaStreamSynchronize"
    assert "idle" not in [t["event"] for t in h["top"]]
    assert _host_cell(h) == "20 launches; cudaStreamSynchronize 3" and _host_cell(None) == "–"


class SimpleProf:
    def __init__(self, events):
        self.events = events

    def key_averages(self):
        return self.events
