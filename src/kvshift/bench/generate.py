"""The generate part: decoding measured through `generate` itself (supersedes the decode part, which
timed a hand-written single-token loop on a prefilled, row-copied cache and missed what generate costs).

Arms (bf16 weights, random init; the timing does not depend on the tokens, greedy, no eos):
  lm-vanilla / lm-kvshift               `kvshift.LM.generate` (our KVCache; the fused Triton decode step
                                        where Triton runs), eager
  lm-kvshift-stateless                  `kvshift.LM.generate(stateless=True)`: the same model on the
                                        standard cache layout (rotated raw k / raw v, shifted on read);
                                        ratio "lm-stateless" against lm-kvshift
  lm-vanilla-compiled / lm-kvshift-compiled
                                        `kvshift.LM.generate(compile=True)`: the eager prefill, then the
                                        static-shape decode step compiled with CUDA graphs
                                        (kvshift.models.static_decode; CUDA only); ratios "lm-compiled"
                                        (kvshift / vanilla) and "lm-compiled-vs-llama" (against
                                        llama-static-compiled)
  hf-vanilla-static / hf-kvshift-static `KVShiftForCausalLM.generate` on transformers' StaticCache (the
                                        stateless read path: rotated raw k / raw v, shifted on read), eager
  llama-static / llama-dynamic          transformers' own `LlamaForCausalLM` of the same shape (SDPA), static
                                        and dynamic cache, eager
  hf-/llama-*-static-compiled           the static-cache arms with transformers' own compile of the decode
                                        step, as a user gets it: generate compiles the forward itself on CUDA
                                        with its default `CompileConfig` (inductor, "reduce-overhead", fullgraph
                                        off, for Llama as for us); KVShiftForCausalLM's step on a StaticCache
                                        traces whole (kvshift.hf.static_view), and the record counts the graph
                                        breaks and the graphs compiled while timed (both 0 when it does)
  hf-kvshift-static-scores-compiled     hf-kvshift-static-compiled with the decode read in the score domain
                                        inside the compiled step too (the default before the shifted copy +
                                        SDPA; kvshift.layers.stateless): ratio "compiled-scores" against it
Eager arms run with `disable_compile=True` (generate would otherwise compile a static-cache decode step on
its own). ms per generated token = (t(prompt + N new) - t(prompt + 1 new)) / (N - 1): the decode steps
through generate, prefill excluded; both generate calls are timed in every iteration, medians over the
iterations, after warm-up calls of both (where the compiled arms compile). The eager arms of a case are timed
interleaved in groups of arms on distinct models (`time_interleaved`: each timed iteration runs every arm of a
group once, in an order rotated from iteration to iteration), so a drift of the host's speed, which a host-bound
eager step feels in full, falls on both arms of every target ratio alike (lm-vanilla / lm-kvshift, the hf and
llama static arms share the first group; lm-kvshift-stateless and llama-dynamic, on the same models as
lm-kvshift and llama-static, form a later one). A group keeps its arms' generate state (transformers' static
caches) alive together. Should a group fail, each arm is timed alone, and only interleaved arms record
`interleaved_with`. The compiled arms run one after another, each compiled afresh.
A case BxPp (`parse_cases`) gives its rows prompts of different lengths, left-padded, and every arm the attention
mask (`padded_prompts`): the masked decode path a server's batches take, where the unpadded cases take the causal
one. With --profile, after an arm's timing, the kernels of one decode step (`kvshift.bench.profile.profile_decode`:
profiled generate with PROFILE_NEW_TOKENS new tokens minus generate with 1, per token, prefill excluded); a
profile that fails is recorded as its error beside the timing, which stands.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from kvshift.bench.plan import Plan, build_model, error_entry, free_memory, fused_available, log, timer_name
from kvshift.bench.profile import profile_decode
from kvshift.bench.report import GEN_ARMS, GEN_RATIOS, ratio
from kvshift.bench.timing import summarize, synchronize
from kvshift.models import ModelConfig

PROFILE_NEW_TOKENS = 9  # the profiled generate call: 8 decode steps beyond the 1-token call (at most N)


def case_name(batch: int, prompt: int, padded: bool = False) -> str:
    return f"b{batch}-p{prompt}" + ("-padded" if padded else "")


def parse_cases(s: str) -> list[tuple]:
    """'1x2048,16x8192,16x2048p' -> [(1, 2048), (16, 8192), (16, 2048, True)] (batch x prompt tokens; a
    trailing p: left-padded prompts, `padded_prompts`)."""
    out = []
    for item in (x.strip() for x in s.split(",") if x.strip()):
        padded = item.lower().endswith("p")
        try:
            b, p = (int(v) for v in item.lower().removesuffix("p").split("x"))
        except ValueError:
            raise ValueError(f"a generate case is BATCHxPROMPT, with a trailing p for left-padded prompts "
                             f"(e.g. 16x2048 or 16x2048p), got {item!r}") from None
        if b < 1 or p < 1 + padded:
            raise ValueError(f"batch and prompt must be >= 1 (a padded prompt >= 2), got {item!r}")
        if padded and b < 2:
            raise ValueError(f"a left-padded case needs a batch of >= 2 (one row has nothing to be padded "
                             f"against), got {item!r}")
        out.append((b, p, True) if padded else (b, p))
    if not out:
        raise ValueError("no generate case given")
    return out


def padded_prompts(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of prompts of different lengths, as a server batches them: row i keeps its last
    P - (P // 2) * i // (B - 1) tokens (the first row all P, the last half of them), left-padded with token 0;
    -> (ids, attention_mask), both (B, P)."""
    B, P = ids.shape
    real = torch.tensor([P - (P // 2) * i // max(B - 1, 1) for i in range(B)], device=ids.device)
    mask = (torch.arange(P, device=ids.device) >= (P - real).view(B, 1)).long()
    return ids * mask, mask


def llama_config(cfg: ModelConfig, max_len: int):
    """transformers' LlamaConfig of the same shape as `cfg` (dims, heads, GQA, SwiGLU width, RoPE base,
    norm eps, tied embeddings), SDPA attention."""
    from transformers import LlamaConfig  # optional dependency (the hf extra)

    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
              num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
              max_position_embeddings=max_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
              attention_bias=False, mlp_bias=False, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    try:
        lc = LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base}, **kw)
    except TypeError:  # transformers without rope_parameters
        lc = LlamaConfig(rope_theta=cfg.rope_base, **kw)
    lc._attn_implementation = "sdpa"
    return lc


def build_gen_models(plan: Plan, arms: list[str], max_len: int, device: torch.device) -> dict[str, torch.nn.Module]:
    """One model per family of arms (lm-/hf-vanilla, lm-/hf-kvshift, llama), bf16, eval, on `device`."""
    base = ModelConfig.from_name(plan.gen_model, max_seq_len=max_len)
    need = {_model_key(a) for a in arms}
    models: dict[str, torch.nn.Module] = {}
    for kind in ("vanilla", "kvshift"):
        if f"lm-{kind}" in need or f"hf-{kind}" in need:
            arm = "vanilla" if kind == "vanilla" else ("fused" if fused_available() else "naive")
            lm = build_model(base, arm, plan.seed).to(torch.bfloat16).eval()
            if f"hf-{kind}" in need:
                from kvshift.hf import KVShiftForCausalLM
                models[f"hf-{kind}"] = KVShiftForCausalLM.from_lm(lm).to(device).eval()
            if f"lm-{kind}" in need:
                models[f"lm-{kind}"] = lm.to(device)
    if "llama" in need:
        from transformers import LlamaForCausalLM
        torch.manual_seed(plan.seed)
        models["llama"] = LlamaForCausalLM(llama_config(base, max_len)).to(device=device, dtype=torch.bfloat16).eval()
    return models


def _model_key(arm: str) -> str:
    return "llama" if arm.startswith("llama") else "-".join(arm.split("-")[:2])


def gen_call(arm: str, model: torch.nn.Module,
             mask: torch.Tensor | None = None) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """generate(ids, n) -> (B, T + n) greedy tokens for `arm` (see the module docstring); mask: the prompts'
    attention mask (left padding), None for full rows."""
    if arm.startswith("lm-"):
        stateless, compiled = arm.endswith("-stateless"), arm.endswith("-compiled")
        return lambda ids, n: model.generate(ids, n, temperature=0.0, attention_mask=mask, stateless=stateless,
                                             compile=compiled)
    static = "static" in arm
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, disable_compile=not arm.endswith("-compiled"),
              cache_implementation="static" if static else None)

    def call(ids, n):
        m = torch.ones_like(ids) if mask is None else mask
        return model.generate(input_ids=ids, attention_mask=m, max_new_tokens=n, min_new_tokens=n, **kw)
    if "-scores-" not in arm:
        return call

    def scores(ids, n):  # the decode read in the score domain inside torch.compile too (see kvshift.layers.stateless)
        from kvshift.layers import stateless
        old, stateless.SCORE_DOMAIN_WHEN_COMPILED = stateless.SCORE_DOMAIN_WHEN_COMPILED, True
        try:
            return call(ids, n)
        finally:
            stateless.SCORE_DOMAIN_WHEN_COMPILED = old
    return scores


def _drop_caches(model: torch.nn.Module) -> None:
    """What transformers keeps on the model between generate calls, dropped between arms and cases: a static
    cache (older versions), the largest static length so far (5.x allocates at least that much again, and
    a Llama's static attention reads the whole allocation: a small case after a large one would be slower)
    and the compiled decode step; for `kvshift.LM`, the buffers of generate(compile=True)."""
    for name in ("_cache", "_previous_max_cache_length", "_compiled_call", "_static_decoder"):
        if name in vars(model):
            delattr(model, name)


def time_generate(call: Callable, ids: torch.Tensor, n: int, *, warmup: int, iters: int,
                  device: torch.device) -> dict:
    """ms per generated token through `call` (see the module docstring), and the prefill + first token."""
    return time_interleaved({"arm": call}, ids, n, warmup=warmup, iters=iters, device=device)["arm"]


def time_interleaved(calls: dict[str, Callable], ids: torch.Tensor, n: int, *, warmup: int, iters: int,
                     device: torch.device) -> dict[str, dict]:
    """`time_generate` of several arms at once: every timed iteration runs each arm once, in an order rotated
    from one iteration to the next, so a drift of the host's speed (an eager step is host-bound) falls on all
    arms alike instead of on whichever ran later. Per arm: ms per generated token and the prefill + first
    token; the compile counters are those of the whole block (0 and 0 for eager arms)."""
    if n < 2:
        raise ValueError(f"new tokens must be >= 2 (the per-token time is the difference of N and 1), got {n}")
    if iters < 1 or not calls:
        raise ValueError(f"time_interleaved needs iters >= 1 and at least one arm, got {iters} and {list(calls)}")
    B, T = ids.shape

    def timed(call: Callable, k: int) -> float:
        synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = call(ids, k)
        synchronize(device)
        dt = (time.perf_counter() - t0) * 1e3
        if tuple(out.shape) != (B, T + k):
            raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected {(B, T + k)}")
        return dt

    names = list(calls)
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    for _ in range(warmup):
        for a in names:
            timed(calls[a], n), timed(calls[a], 1)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    full, one = {a: [] for a in names}, {a: [] for a in names}
    for i in range(iters):
        for a in names[i % len(names):] + names[:i % len(names)]:
            full[a].append(timed(calls[a], n))
            one[a].append(timed(calls[a], 1))
    counters = {  # torch.compile graphs made during the timed calls (recompiles there would inflate the time): 0
        "graphs_compiled_while_timed": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs,
        # graph breaks dynamo met in these calls (warm-up included): 0 for a decode step compiled whole
        "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()) - breaks}
    out = {}
    for a in names:
        s = summarize([(f - o) / (n - 1) for f, o in zip(full[a], one[a])])
        out[a] = {**s, "ms_per_token": s["median_ms"], "tokens_per_s": B / (s["median_ms"] / 1e3),
                  "first_token": summarize(one[a]), "generate_ms": summarize(full[a]), **counters}
    return out


def interleave_groups(arms: list[str]) -> list[list[str]]:
    """The eager arms in groups timed together (`time_interleaved`), no two arms of one group on the same
    model (an arm's generate state, e.g. transformers' static cache, is dropped before its group only):
    each arm joins the first group without its model, in the order given."""
    groups: list[list[str]] = []
    for a in arms:
        g = next((g for g in groups if _model_key(a) not in {_model_key(b) for b in g}), None)
        if g is None:
            groups.append([a])
        else:
            g.append(a)
    return groups


def bench_generate(plan: Plan, device: torch.device, save: Callable[[dict], None]) -> dict:
    cuda = device.type == "cuda"
    arms = [a for a in (plan.gen_arms or GEN_ARMS) if cuda or not a.endswith("-compiled")]
    arms = [a for a in arms if plan.gen_compile or not a.endswith("-compiled")]
    bad = sorted(set(arms) - set(GEN_ARMS))
    if bad:
        raise ValueError(f"unknown generate arms {bad}; choose from {GEN_ARMS}")
    n = plan.gen_new_tokens
    max_len = max(c[1] for c in plan.gen_cases) + n + 8
    section = {"model": plan.gen_model, "new_tokens": n,
               "settings": {"dtype": "bf16", "warmup": plan.gen_warmup, "iters": plan.gen_iters, "sampling": "greedy",
                            "arms": arms, "timer": timer_name(device).replace("cuda-events", "perf_counter + synchronize"),
                            "per_token": "(t(N new) - t(1 new)) / (N - 1) through generate",
                            **({"profile": f"kernels of generate({min(n, PROFILE_NEW_TOKENS)} new) - generate(1 new), "
                                           "per token"} if plan.profile else {})},
               "cases": {}}
    try:
        models = build_gen_models(plan, arms, max_len, device)
    except Exception as e:  # noqa: BLE001
        section["error"] = error_entry(e)["error"]
        return section
    g = torch.Generator().manual_seed(plan.seed + 1)
    vocab = ModelConfig.from_name(plan.gen_model).vocab_size
    for batch, prompt, *pad in sorted(plan.gen_cases, key=lambda c: c[0] * c[1]):  # small first: a cut run keeps
        padded = bool(pad and pad[0])
        name = case_name(batch, prompt, padded)
        case = {"batch": batch, "prompt": prompt, "arms": {}, "ratios": {}}
        section["cases"][name] = case
        ids = torch.randint(1, vocab, (batch, prompt), generator=g).to(device)
        mask = None
        if padded:
            ids, mask = padded_prompts(ids)
            case["padded"] = {"real_tokens": mask.sum(1).tolist(), "rule": "row i keeps its last "
                              "P - (P // 2) * i // (B - 1) tokens, left-padded; every arm gets the mask"}
        done: dict[str, dict] = {}
        # eager arms interleaved in groups (a host-bound step: one host drift for all), compiled ones one by one
        for group in interleave_groups([a for a in arms if not a.endswith("-compiled")]) + [
                [a] for a in arms if a.endswith("-compiled")]:
            log(f"generate {name} {', '.join(group)}" + (" (interleaved)" if len(group) > 1 else ""))
            for arm in group:
                _drop_caches(models[_model_key(arm)])
            if group[0].endswith("-compiled"):
                torch._dynamo.reset()  # a fresh compile per arm and case: no recompile limit reached across cases
            t0 = time.perf_counter()
            calls = {arm: gen_call(arm, models[_model_key(arm)], mask) for arm in group}
            together = len(group) > 1
            try:
                res = time_interleaved(calls, ids, n, warmup=plan.gen_warmup, iters=plan.gen_iters, device=device)
            except Exception:  # noqa: BLE001 - one failing arm must not take its group down: each alone
                res, together = {}, False
                for arm in group:
                    try:
                        res[arm] = time_generate(calls[arm], ids, n, warmup=plan.gen_warmup, iters=plan.gen_iters,
                                                 device=device)
                    except Exception as e:  # noqa: BLE001
                        res[arm] = error_entry(e)
            share = (time.perf_counter() - t0) / len(group)
            for arm in group:
                done[arm], wall = res[arm], share
                if together:  # the arms this one's iterations alternated with
                    res[arm]["interleaved_with"] = [a for a in group if a != arm]
                if "error" not in res[arm]:
                    log(f"  {arm}: {res[arm]['ms_per_token']:.3f} ms/token")
                if plan.profile and "error" not in res[arm]:
                    t1 = time.perf_counter()
                    try:
                        prof = profile_decode(calls[arm], ids, min(n, PROFILE_NEW_TOKENS), device)
                    except Exception as e:  # noqa: BLE001 - the timing stands without the profile
                        prof = error_entry(e)
                    res[arm]["profile"] = prof
                    wall += time.perf_counter() - t1
                res[arm]["wall_s"] = wall
            for arm in group:
                _drop_caches(models[_model_key(arm)])
            free_memory(device)
        case["arms"] = {arm: done[arm] for arm in arms}
        ok = {a: r.get("ms_per_token") for a, r in case["arms"].items() if "error" not in r}
        case["ratios"] = {k: ratio(ok.get(a), ok.get(b)) for k, (a, b) in GEN_RATIOS.items()}
        del ids, mask
        free_memory(device)
        save({"generate": section})
    del models
    free_memory(device)
    return section
