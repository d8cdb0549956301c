"""The attn and generate parts of `kvshift bench` on CPU at tiny shapes: the plan holds them, every arm gets
the output gradient in the layout the model's attention layer hands it, every arm runs under the same
attention kernel family, generate runs end to end (CPU timings: structure only), and the report renders
new and superseded sections, with targets from the new ones only."""

import json
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend

import kvshift.bench.attn as attn_mod
from kvshift.bench.attn import FAMILIES, attn_forward, attn_inputs, attn_step
from kvshift.bench.generate import bench_generate, case_name, llama_config, padded_prompts, parse_cases
from kvshift.bench.plan import DEFAULT_PARTS, LEGACY_PARTS, PARTS, Plan, fused_available
from kvshift.bench.report import (ATTN_ARMS, GEN_ARMS, GEN_RATIOS, GEN_TARGET_RATIOS, compute_targets,
                                  render_markdown)
from kvshift.bench.timing import measure_modes
from kvshift.layers.attention import Attention, AttentionContext
from kvshift.models import LM, ModelConfig
from kvshift.ops.rope import rope_cos_sin

REPO = Path(__file__).resolve().parents[2]


def test_plan_holds_the_new_parts():
    full = Plan.full()
    assert full.parts == DEFAULT_PARTS == ("attn", "generate", "e2e") and set(LEGACY_PARTS) < set(PARTS)
    assert set(full.attn_families) == {"cudnn", "flash"} and set(full.block_modes) == {"eager", "compiled"}
    assert {b for b, _ in full.gen_cases} == {1, 16, 128} and {p for _, p in full.gen_cases} == {2048, 8192}
    assert len(full.gen_cases) == 6 and full.gen_new_tokens == 128 and full.gen_model == "bench-246m"
    quick = Plan.quick_plan(False)
    assert "cudnn" not in quick.attn_families and quick.gen_model == "debug" and not quick.gen_compile
    assert parse_cases("1x2048, 16x8192") == [(1, 2048), (16, 8192)]
    with pytest.raises(ValueError, match="BATCHxPROMPT"):
        parse_cases("16-2048")
    assert parse_cases("16x2048p,2x8P") == [(16, 2048, True), (2, 8, True)]
    with pytest.raises(ValueError, match="padded prompt >= 2"):
        parse_cases("4x1p")
    with pytest.raises(ValueError, match="batch of >= 2.*'1x8p'"):
        parse_cases("1x8p")


def test_padded_prompts_spread_real_lengths_and_left_pad():
    ids = torch.arange(1, 41).view(4, 10)
    padded, mask = padded_prompts(ids)
    assert mask.sum(1).tolist() == [10, 9, 7, 5]  # from all P down to half of them
    for row, m, full in zip(padded, mask, ids):
        n = int(m.sum())
        assert m[-n:].all() and not m[:-n].any() and (row[:-n] == 0).all() and torch.equal(row[-n:], full[-n:])
    assert padded_prompts(ids[:1])[1].all()  # one row: nothing to pad


def test_generate_runs_padded_cases_with_the_mask(one_thread, monkeypatch):
    """A padded case gives every arm its prompts' attention mask: the lm arms' tokens equal a generate call
    given the same mask, the case is named and rendered as padded, and its ratios are targets like any case."""
    import kvshift.bench.generate as gen

    plan = Plan.quick_plan(False)
    plan.gen_cases, plan.gen_new_tokens, plan.gen_iters = [(3, 6, True)], 3, 1
    plan.gen_arms = ("lm-vanilla", "lm-kvshift", "hf-kvshift-static", "llama-static")
    masks = []
    real = gen.gen_call
    monkeypatch.setattr(gen, "gen_call",
                        lambda arm, model, mask=None: masks.append((arm, mask)) or real(arm, model, mask))
    sec = bench_generate(plan, torch.device("cpu"), lambda u: None)
    name = case_name(3, 6, True)
    assert list(sec["cases"]) == [name] and name == "b3-p6-padded"
    c = sec["cases"][name]
    assert c["padded"]["real_tokens"] == [6, 5, 3] and all("error" not in r for r in c["arms"].values())
    assert {a for a, _ in masks} == set(plan.gen_arms)
    assert all(m is not None and m.sum(1).tolist() == [6, 5, 3] for _, m in masks)
    ids, mask = padded_prompts(torch.ones(3, 6, dtype=torch.long))
    lm = LM(ModelConfig.from_name("debug"), seed=0).eval()
    want = lm.generate(ids, 3, temperature=0.0, attention_mask=mask)
    assert torch.equal(gen.gen_call("lm-kvshift", lm, mask)(ids, 3), want)
    assert not torch.equal(gen.gen_call("lm-kvshift", lm)(ids, 3), want)  # the mask changes the tokens
    res = {"meta": {"device": "cpu", "quick": True}, "generate": sec}
    tg = compute_targets(res)
    assert f"generate/{name}/lm_ratio" in tg
    assert "| 3 | 6 (left-padded) |" in render_markdown({**res, "targets": tg})


def _model_layout(attention: str, B, T, H, H_kv, D):
    """What the model's attention layer hands its output projection and gets back from it."""
    layer = Attention(H * D, H, H_kv, attention=attention, shift_impl="naive")
    seen = {}
    layer.wo.register_forward_pre_hook(lambda m, a: seen.update(out=(tuple(a[0].shape), a[0].stride())))
    layer.wo.register_full_backward_hook(lambda m, gi, go: seen.update(grad=(tuple(gi[0].shape), gi[0].stride())))
    cos, sin = rope_cos_sin(torch.arange(T).view(1, T), D)
    x = torch.randn(B, T, H * D, requires_grad=True)
    layer(x, AttentionContext(cos=cos, sin=sin)).sum().backward()
    return seen


@pytest.mark.parametrize("shape", [(2, 9, 4, 4, 8), (1, 7, 4, 2, 16)], ids=["mha", "gqa"])
def test_every_arm_gets_the_models_gradient_layout(shape):
    B, T, H, H_kv, D = shape
    inp = attn_inputs(B, T, H, H_kv, D, device="cpu", dtype=torch.float32)
    go = inp["grad_out"]
    for attention in ("vanilla", "kvshift"):
        model = _model_layout(attention, B, T, H, H_kv, D)
        assert (tuple(go.shape), go.stride()) == model["grad"], attention  # what wo's backward hands back
        assert model["out"][0] == (B, T, H * D)
    arms = [a for a in ATTN_ARMS if a == "vanilla" or fused_available()]
    assert "vanilla" in arms
    for arm in arms:
        out = attn_forward(arm, inp, "math")(inp["q"], inp["k"], inp["v"], inp["w_k"], inp["w_v"])
        assert (tuple(out.shape), out.stride()) == model["out"], arm  # the layout the projection takes
        assert out.shape == go.shape
    wo = attn_inputs(B, T, H, H_kv, D, device="cpu", dtype=torch.float32, grad="wo")
    assert wo["wo"].shape == (H * D, H * D) and wo["grad_out"].shape == (B, T, H * D)
    out = attn_forward("vanilla", wo, "math")(wo["q"], wo["k"], wo["v"], wo["w_k"], wo["w_v"])
    assert out.shape == wo["grad_out"].shape


def test_every_arm_runs_under_the_same_kernel_family(monkeypatch):
    """vanilla and fused-sdpa call SDPA with exactly the family's backend enabled; the one-op fused arm asks
    shift_attention for the same family (spies stand in for the kernels, so cuDNN is checked on a CPU)."""
    seen = []
    flags = {SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
             SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled,
             SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled,
             SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled}

    def sdpa(q, k, v, **kw):
        seen.append(("sdpa", frozenset(b for b, on in flags.items() if on())))
        return q * 1.0 + 0.0 * (k.sum() + v.sum())

    def one_op(q, k, v, w_k, w_v, cos, sin, *, impl, backend):
        seen.append(("fused", backend))
        return q * 1.0 + 0.0 * (k.sum() + v.sum() + w_k.sum() + w_v.sum())

    monkeypatch.setattr(attn_mod.F, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(attn_mod, "shift_attention", one_op)
    monkeypatch.setattr(attn_mod, "shift_rope", lambda k, w, cos, sin, impl: k * w[:, :1].sum())
    monkeypatch.setattr(attn_mod, "kv_shift", lambda v, w, impl: v * w[:, :1].sum())
    inp = attn_inputs(1, 6, 4, 2, 8, device="cpu", dtype=torch.float32)
    for family, (backend, fused_backend) in FAMILIES.items():
        for gqa in ("native", "expand"):
            seen.clear()
            for arm in ATTN_ARMS:
                attn_step(arm, inp, family, gqa=gqa)()
            assert seen == [("sdpa", frozenset({backend})), ("sdpa", frozenset({backend})),
                            ("fused", fused_backend)], (family, gqa)
    assert FAMILIES["cudnn"][1] == "cudnn" and FAMILIES["flash"][1] == "flash"
    assert torch.backends.cuda.math_sdp_enabled()  # the context is left


def test_measure_modes_times_both_ways():
    calls = []
    fns = {a: (lambda a=a: calls.append(a)) for a in ("x", "y")}
    res = measure_modes(fns, warmup=1, iters=3, rounds=2, device=torch.device("cpu"))
    assert calls[:2] == ["x", "y"] and calls[2:8] == ["x", "y", "y", "x", "x", "y"]
    assert len(calls) == 2 + 6 + 2 * 2 * 3
    for r in res.values():
        assert r["sync"]["n"] == 3 and r["b2b"]["n"] == 2


def test_llama_has_the_shape_of_the_bench_model():
    from transformers import LlamaForCausalLM

    cfg = ModelConfig.from_name("debug", attention="vanilla")
    lm, llama = LM(cfg, seed=0), LlamaForCausalLM(llama_config(cfg, 64))
    assert sum(p.numel() for p in lm.parameters()) == sum(p.numel() for p in llama.parameters())
    lc = llama.config
    assert (lc.num_attention_heads, lc.num_key_value_heads, lc.intermediate_size) == (cfg.n_heads, cfg.n_kv_heads,
                                                                                       cfg.ffn_dim)


def test_generate_runs_end_to_end_on_cpu(one_thread):
    plan = Plan.quick_plan(False)
    plan.gen_cases, plan.gen_new_tokens, plan.gen_iters = [(2, 6), (1, 5)], 3, 1
    saved = []
    sec = bench_generate(plan, torch.device("cpu"), lambda u: saved.append(json.loads(json.dumps(u))))
    eager = [a for a in GEN_ARMS if not a.endswith("-compiled")]
    assert sec["settings"]["arms"] == eager and "error" not in sec
    assert list(sec["cases"]) == [case_name(1, 5), case_name(2, 6)]  # smallest first
    for c in sec["cases"].values():
        assert list(c["arms"]) == eager
        for arm, r in c["arms"].items():
            assert "error" not in r, (arm, r)
            assert r["n"] == 1 and r["first_token"]["n"] == 1 and r["generate_ms"]["median_ms"] > 0
            assert r["graphs_compiled_while_timed"] == 0 and r["graph_breaks"] == 0
            assert r["tokens_per_s"] == pytest.approx(c["batch"] / (r["ms_per_token"] / 1e3))
        assert set(c["ratios"]) == set(GEN_RATIOS)
        assert c["ratios"]["lm"] == pytest.approx(c["arms"]["lm-kvshift"]["ms_per_token"]
                                                  / c["arms"]["lm-vanilla"]["ms_per_token"])
        assert c["ratios"]["lm-stateless"] == pytest.approx(c["arms"]["lm-kvshift-stateless"]["ms_per_token"]
                                                            / c["arms"]["lm-kvshift"]["ms_per_token"])
        assert c["ratios"]["compiled"] is None and c["ratios"]["lm-compiled"] is None
    assert len(saved) == 2 and "generate" in saved[-1]
    res = {"meta": {"device": "cpu", "quick": True}, "generate": sec}
    tg = compute_targets(res)
    assert set(tg) == {f"generate/{n}/{r}_ratio" for n in sec["cases"] for r in GEN_TARGET_RATIOS
                       if "compiled" not in r}  # no compiled arm on a CPU: no target for it
    md = render_markdown({**res, "targets": tg})
    assert "## Decoding through generate" in md and "| 2 | 6 |" in md


def _arm(ms, kernels=None):
    t = {"median_ms": ms, "p10_ms": ms, "p90_ms": ms}
    return {"sync": t, "b2b": t, **({"kernels": {"total_ms_per_step": kernels, "top": []}} if kernels else {})}


def test_report_targets_come_from_the_new_parts_only():
    old = json.loads((REPO / "results" / "bench" / "nvidia-h200.json").read_text())
    assert old["block"]["shapes"] and old["decode"]["batches"]  # the old numbers are kept
    tg = compute_targets(old)
    assert tg and not any(k.startswith(("block/", "decode/")) for k in tg)
    md = render_markdown(old)
    assert "## Superseded: attention block" in md and "## Superseded: decode" in md and "0.611" in md
    # the training-step profile: beside the kernels' total, what the timed step spends outside them
    for name, m in old["e2e"]["models"].items():
        for arm, a in m["arms"].items():
            if isinstance(a, dict) and "top" in a.get("profile", {}):
                tot = a["profile"]["total_ms_per_step"]
                assert f"| {name} | {arm} | {tot:.2f} | {a['step']['median_ms'] - tot:.2f} |" in md
    attn = {"settings": {}, "shapes": {"B8-T2048-H16-D128-cudnn-eager": {
        "B": 8, "T": 2048, "H": 16, "H_kv": 16, "D": 128, "family": "cudnn", "mode": "eager", "gqa": "native",
        "arms": {"vanilla": _arm(4.0, 3.9), "fused-sdpa": _arm(4.4), "fused": _arm(3.8, 3.7)},
        "ratios": {"b2b": {"fused": 0.95, "fused-sdpa": 1.1}, "sync": {"fused": 0.97}, "kernels": {"fused": 0.949}}}}}
    res = {**old, "attn": attn}
    tg = compute_targets(res)
    assert tg["attn/B8-T2048-H16-D128-cudnn-eager/time_ratio"]["measured"] == 0.95
    md = render_markdown({**res, "targets": tg})
    assert "## Attention block as a model runs it" in md and "| cudnn | eager | native |" in md
    assert md.index("## Attention block as a model runs it") < md.index("## Superseded: attention block")


def test_merge_keeps_the_sources_of_a_merged_file(tmp_path):
    from kvshift.bench.run import merge_results

    old = json.loads((REPO / "results" / "bench" / "nvidia-h200.json").read_text())
    new = {"meta": {**old["meta"], "command": "kvshift bench --only generate", "merged_from": None},
           "generate": {"settings": {}, "cases": {"b1-p2048": {"batch": 1, "prompt": 2048, "arms": {}, "ratios": {}}}},
           "e2e": {**old["e2e"], "from_earlier_run": True}}
    pa, pb = tmp_path / "old.json", tmp_path / "new.json"
    pa.write_text(json.dumps(old))
    pb.write_text(json.dumps(new))
    res = merge_results([pa, pb], tmp_path / "out")
    files = [m["file"] for m in res["meta"]["merged_from"]]
    assert files == [m["file"] for m in old["meta"]["merged_from"]] + ["new.json"]
    assert res["block"] == old["block"] and res["e2e"] == old["e2e"]
    # the new run's case joins the file's own (a case both measured unites their arms)
    assert list(res["generate"]["cases"]) == list(dict.fromkeys([*old.get("generate", {}).get("cases", {}), "b1-p2048"]))


def test_merge_unites_the_arms_of_a_generate_case(tmp_path):
    from kvshift.bench.run import merge_results

    meta = {"device": "X", "device_slug": "x", "quick": False}

    def run(arms):
        return {"meta": meta, "generate": {"settings": {}, "cases": {"b1-p8": {
            "batch": 1, "prompt": 8, "arms": {a: {"ms_per_token": ms} for a, ms in arms.items()}, "ratios": {}}}}}

    paths = []
    for i, arms in enumerate(({"lm-vanilla": 10.0, "lm-kvshift": 11.0, "llama-static": 8.0},
                              {"hf-kvshift-static": 9.0, "hf-vanilla-static-compiled": 5.0,
                               "hf-kvshift-static-compiled": 5.5, "llama-static-compiled": 5.0})):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(run(arms)))
    case = merge_results(paths, tmp_path / "out")["generate"]["cases"]["b1-p8"]
    assert len(case["arms"]) == 7 and case["ratios"]["lm"] == pytest.approx(1.1)
    assert case["ratios"]["compiled"] == pytest.approx(1.1) and case["ratios"]["hf-static-vs-llama"] == pytest.approx(9 / 8)
    assert case["cross_run_ratios"] == ["hf-static-vs-llama"]
    # a third run merged into that file: the mark of the first two runs' ratio stays (each arm names its run)
    meta3 = {**meta, "time_utc": "2026-12-02T12:00:00Z"}
    paths.append(tmp_path / "2.json")
    paths[-1].write_text(json.dumps({**run({"lm-vanilla": 12.0, "lm-kvshift": 12.0}), "meta": meta3}))
    case = merge_results([tmp_path / "out" / "x.json", paths[-1]], tmp_path / "out2")["generate"]["cases"]["b1-p8"]
    assert case["ratios"]["lm"] == pytest.approx(1.0) and case["ratios"]["hf-static-vs-llama"] == pytest.approx(9 / 8)
    assert case["cross_run_ratios"] == ["hf-static-vs-llama"]
    assert case["arm_runs"]["lm-kvshift"] == "2026-12-02T12:00:00Z"
    assert case["arm_runs"]["hf-kvshift-static"] != case["arm_runs"]["llama-static"]
    # a target of two runs' arms is shown but neither met nor missed; one run's ratio is judged
    res = json.loads((tmp_path / "out2" / "x.json").read_text())
    cross, same = (res["targets"][f"generate/b1-p8/{r}_ratio"] for r in ("hf-static-vs-llama", "lm"))
    assert cross["measured"] == pytest.approx(9 / 8) and cross["met"] is None and cross["cross_run"]
    assert same["met"] is True and "cross_run" not in same
    assert "| generate/b1-p8/hf-static-vs-llama_ratio | 1.1250 | <= 1.02 | n/a (arms of two runs) |" in \
        (tmp_path / "out2" / "x.md").read_text()


def test_compiled_lm_arms_ratios_and_targets():
    """LM.generate(compile=True) arms: CUDA only (filtered on a CPU like transformers' compiled arms), the
    KV-shift / vanilla ratio and the ratio to transformers' compiled static Llama are decode-latency targets."""
    from kvshift.bench.generate import gen_call

    assert {"lm-vanilla-compiled", "lm-kvshift-compiled"} <= set(GEN_ARMS)
    assert GEN_RATIOS["lm-compiled"] == ("lm-kvshift-compiled", "lm-vanilla-compiled")
    assert GEN_RATIOS["lm-compiled-vs-llama"] == ("lm-kvshift-compiled", "llama-static-compiled")
    assert {"lm-compiled", "lm-compiled-vs-llama"} <= set(GEN_TARGET_RATIOS)
    seen = {}

    class Spy:
        def generate(self, ids, n, **kw):
            seen.update(kw)
    gen_call("lm-kvshift-compiled", Spy())(torch.zeros(1, 2, dtype=torch.long), 3)
    assert seen == {"temperature": 0.0, "attention_mask": None, "stateless": False, "compile": True}
    gen_call("lm-kvshift", Spy())(torch.zeros(1, 2, dtype=torch.long), 3)
    assert seen["compile"] is False
    res = {"meta": {"device": "x"}, "generate": {"cases": {"b1-p8": {"batch": 1, "prompt": 8, "arms": {
        "lm-vanilla-compiled": {"ms_per_token": 2.0}, "lm-kvshift-compiled": {"ms_per_token": 2.02},
        "llama-static-compiled": {"ms_per_token": 2.1}}, "ratios": {"lm-compiled": 1.01,
                                                                    "lm-compiled-vs-llama": 2.02 / 2.1}}}}}
    tg = compute_targets(res)
    assert tg["generate/b1-p8/lm-compiled_ratio"]["met"] is True
    assert tg["generate/b1-p8/lm-compiled-vs-llama_ratio"]["met"] is True


def test_generate_state_is_dropped_between_arms_and_cases():
    """transformers keeps the largest static length on the model and allocates at least that much again: a
    small case after a large one would time a Llama reading a longer cache than it needs."""
    from kvshift.bench.generate import _drop_caches

    m = torch.nn.Linear(2, 2)
    m._previous_max_cache_length, m._cache, m._compiled_call, m._static_decoder = 9000, object(), object(), object()
    _drop_caches(m)
    assert not any(hasattr(m, n) for n in ("_previous_max_cache_length", "_cache", "_compiled_call", "_static_decoder"))
    _drop_caches(m)  # nothing there: nothing to do


@pytest.mark.parametrize("args, what", [(["--gen-arms", "lm-vanilla,nope"], "--gen-arms"),
                                        (["--families", "cuda"], "--families"), (["--modes", "fast"], "--modes"),
                                        (["--gen-cases", "16-2048"], "BATCHxPROMPT")])
def test_bench_options_refuse_unknown_values(args, what, capsys, tmp_path):
    from kvshift.cli import main

    assert main(["bench", "--quick", "--out", str(tmp_path), "--only", "attn", *args]) == 2
    assert what in capsys.readouterr().err and not list(tmp_path.iterdir())  # refused before running anything


def test_a_compiled_step_follows_its_family(monkeypatch):
    """A compiled step chooses its SDPA kernel inside the traced function: the graph compiled for one family
    is not replayed for the next (on an H200 the flash rows once ran the cuDNN kernels of the previous
    family's graph). On a CPU: math, then flash, whose CPU kernel is its own aten op."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="aot_eager"))
    torch._dynamo.reset()
    inp = attn_inputs(1, 16, 2, 2, 8, device="cpu", dtype=torch.float32)
    ops = {}
    for family in ("math", "flash"):
        step = attn_step("vanilla", inp, family, compiled=True)
        step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        ops[family] = {e.key for e in prof.key_averages()}
    flash_op = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert flash_op in ops["flash"] and flash_op not in ops["math"]
    torch._dynamo.reset()


def test_scores_arm_reads_in_the_score_domain_inside_compile_and_restores_the_default(monkeypatch):
    """hf-kvshift-static-scores-compiled differs from hf-kvshift-static-compiled only in the compiled decode
    read: the flag is on during its generate calls, and back off after (also when the call fails)."""
    from kvshift.bench.generate import gen_call
    from kvshift.layers import stateless

    seen = []

    class Fake:
        def generate(self, **kw):
            seen.append((stateless.SCORE_DOMAIN_WHEN_COMPILED, kw["disable_compile"], kw["cache_implementation"]))
            if kw["max_new_tokens"] == 2:
                raise RuntimeError("boom")
            return kw["input_ids"]

    ids = torch.ones(1, 3, dtype=torch.long)
    gen_call("hf-kvshift-static-scores-compiled", Fake())(ids, 1)
    gen_call("hf-kvshift-static-compiled", Fake())(ids, 1)
    with pytest.raises(RuntimeError):
        gen_call("hf-kvshift-static-scores-compiled", Fake())(ids, 2)
    assert seen == [(True, False, "static"), (False, False, "static"), (True, False, "static")]
    assert stateless.SCORE_DOMAIN_WHEN_COMPILED is False
    assert GEN_RATIOS["compiled-scores"] == ("hf-kvshift-static-scores-compiled", "hf-kvshift-static-compiled")


def test_eager_arms_are_timed_interleaved_in_groups_of_distinct_models(monkeypatch):
    """The eager arms of a case run interleaved (a host drift falls on every arm of a ratio), no two arms of a
    group on one model; each iteration rotates the order; the per-arm times are that arm's own."""
    from kvshift.bench.generate import interleave_groups, time_interleaved

    eager = [a for a in GEN_ARMS if not a.endswith("-compiled")]
    groups = interleave_groups(eager)
    assert groups[0][:2] == ["lm-vanilla", "lm-kvshift"] and "hf-kvshift-static" in groups[0]
    assert "lm-kvshift-stateless" not in groups[0] and sorted(sum(groups, [])) == sorted(eager)
    for g in groups:
        keys = [a.split("-")[0] + ("" if a.startswith("llama") else "-" + a.split("-")[1]) for a in g]
        assert len(set(keys)) == len(keys), g
    seen, clock = [], [0.0]

    def fake(arm, per_token_ms):  # advances a virtual clock: 2 ms of prefill, then per_token_ms per new token
        def call(ids, k):
            seen.append((arm, k))
            clock[0] += (2.0 + per_token_ms * k) / 1e3
            return torch.zeros(ids.shape[0], ids.shape[1] + k)
        return call
    import kvshift.bench.generate as gen
    monkeypatch.setattr(gen.time, "perf_counter", lambda: clock[0])
    out = time_interleaved({"a": fake("a", 1.0), "b": fake("b", 3.0), "c": fake("c", 0.5)}, torch.zeros(2, 4),
                           5, warmup=1, iters=3, device=torch.device("cpu"))
    order = [a for a, k in seen[6:] if k == 5]  # after the warm-up (3 arms x 2 calls)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [k for _, k in seen[6:8]] == [5, 1]  # each arm's N-token call, then its 1-token call
    for a, per in (("a", 1.0), ("b", 3.0), ("c", 0.5)):
        assert out[a]["n"] == 3 and out[a]["graph_breaks"] == 0
        assert out[a]["ms_per_token"] == pytest.approx(per) and out[a]["first_token"]["median_ms"] == pytest.approx(
            2.0 + per)


def test_a_failing_arm_leaves_the_rest_of_its_group_timed(one_thread, monkeypatch):
    import kvshift.bench.generate as gen

    plan = Plan.quick_plan(False)
    plan.gen_cases, plan.gen_new_tokens, plan.gen_iters = [(1, 5)], 3, 1
    plan.gen_arms = ["lm-vanilla", "lm-kvshift"]
    real = gen.gen_call

    def broken(arm, model, mask=None):
        if arm == "lm-kvshift":
            def fail(ids, n):
                raise RuntimeError("boom")
            return fail
        return real(arm, model, mask)
    monkeypatch.setattr(gen, "gen_call", broken)
    sec = gen.bench_generate(plan, torch.device("cpu"), lambda u: None)
    arms = sec["cases"]["b1-p5"]["arms"]
    assert list(arms) == ["lm-vanilla", "lm-kvshift"]
    assert "error" not in arms["lm-vanilla"] and arms["lm-vanilla"]["ms_per_token"] > 0
    assert "boom" in arms["lm-kvshift"]["error"]
    assert "interleaved_with" not in arms["lm-vanilla"]  # it ran alone after the group failed


def test_the_report_names_the_arms_timed_interleaved(tmp_path, one_thread):
    """A run's eager arms carry the arms they alternated with; the report names each group whose arms are all
    still there from one run, and a merge that replaces one of them drops the group."""
    from kvshift.bench.report_parts import render_generate
    from kvshift.bench.run import merge_results

    plan = Plan.quick_plan(False)
    plan.gen_cases, plan.gen_new_tokens, plan.gen_iters = [(1, 5)], 3, 1
    plan.gen_arms = ["lm-vanilla", "lm-kvshift", "lm-kvshift-stateless"]
    sec = bench_generate(plan, torch.device("cpu"), lambda u: None)
    arms = sec["cases"]["b1-p5"]["arms"]
    assert arms["lm-vanilla"]["interleaved_with"] == ["lm-kvshift"]
    assert arms["lm-kvshift"]["interleaved_with"] == ["lm-vanilla"]
    assert "interleaved_with" not in arms["lm-kvshift-stateless"]  # alone: the same model as lm-kvshift
    text = "\n".join(render_generate(sec))
    assert "Timed interleaved" in text and "b1-p5: lm-vanilla, lm-kvshift." in text
    meta = {"device": "X", "device_slug": "x", "quick": False}
    paths = []
    later = {"settings": {}, "cases": {"b1-p5": {"batch": 1, "prompt": 5, "arms": {"lm-kvshift": {"ms_per_token": 1.0}},
                                                 "ratios": {}}}}
    for i, g in enumerate((sec, later)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps({"meta": {**meta, "time_utc": f"2026-12-0{i + 1}T00:00:00Z"}, "generate": g}))
    merged = merge_results(paths[:1], tmp_path / "a")["generate"]
    assert "b1-p5: lm-vanilla, lm-kvshift" in "\n".join(render_generate(merged))
    merged = merge_results(paths, tmp_path / "b")["generate"]
    assert "Timed interleaved" not in "\n".join(render_generate(merged))  # lm-kvshift now from another run
