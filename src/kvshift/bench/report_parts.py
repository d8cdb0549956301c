"""Markdown tables of the attn and generate parts (pure functions of the result dict; see report)."""

from __future__ import annotations

ATTN_ARMS = ("vanilla", "fused-sdpa", "fused")
GEN_ARMS = ("lm-vanilla", "lm-kvshift", "lm-kvshift-stateless", "hf-vanilla-static", "hf-kvshift-static",
            "llama-static", "llama-dynamic",
            "lm-vanilla-compiled", "lm-kvshift-compiled",
            "hf-vanilla-static-compiled", "hf-kvshift-static-compiled", "llama-static-compiled",
            "hf-kvshift-static-scores-compiled")
# ratio name -> (numerator arm, denominator arm); GEN_TARGET_RATIOS are the decode-latency targets (<= 1.02)
GEN_RATIOS = {"lm": ("lm-kvshift", "lm-vanilla"),
              "hf-static": ("hf-kvshift-static", "hf-vanilla-static"),
              "hf-static-vs-llama": ("hf-kvshift-static", "llama-static"),
              "compiled": ("hf-kvshift-static-compiled", "hf-vanilla-static-compiled"),
              "compiled-vs-llama": ("hf-kvshift-static-compiled", "llama-static-compiled"),
              "lm-vs-llama-dynamic": ("lm-kvshift", "llama-dynamic"),
              "lm-stateless": ("lm-kvshift-stateless", "lm-kvshift"),
              "lm-compiled": ("lm-kvshift-compiled", "lm-vanilla-compiled"),
              "lm-compiled-vs-llama": ("lm-kvshift-compiled", "llama-static-compiled"),
              # the compiled step's decode read in the score domain (the default before) / the shifted copy + SDPA
              "compiled-scores": ("hf-kvshift-static-scores-compiled", "hf-kvshift-static-compiled")}
GEN_TARGET_RATIOS = ("lm", "hf-static-vs-llama", "compiled-vs-llama", "lm-compiled", "lm-compiled-vs-llama")

ATTN_NOTE = (
    "Every arm returns (B, T, H*D), the layout the output projection takes, and gets the gradient of that "
    "layout ((B, T, H*D) contiguous, what `wo`'s backward gives; grad=wo: through a real projection). Each row "
    "fixes one attention kernel family for every arm: vanilla and fused-sdpa run SDPA under "
    "`sdpa_kernel(<family>)`, the one-op fused arm calls the same family's kernels itself. sync: each "
    "iteration timed on its own with a synchronize (launch overhead included); b2b: N iterations back to back "
    "between two events, per iteration (the target's number); graph: the step replayed as a CUDA graph; "
    "kernels: the summed GPU time of the step's kernels (torch.profiler). The old block table below was "
    "misleading (see its note).")


def _ms(a: dict | None, kind: str) -> str:
    if not isinstance(a, dict) or "error" in a or "skipped" in a:
        return "error" if isinstance(a, dict) and "error" in a else ("skipped" if a else "–")
    r = a.get(kind)
    if not isinstance(r, dict) or "error" in r:
        return "error" if isinstance(r, dict) else "–"
    if kind == "kernels":
        return f"{r['total_ms_per_step']:.3f}"
    return f"{r['median_ms']:.3f}"


def _r(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def render_attn(sec: dict | None) -> list[str]:
    if not sec:
        return []
    st = sec.get("settings", {})
    kinds = ("sync", "b2b", "graph", "kernels")
    lines = ["## Attention block as a model runs it, forward + backward (ms per iteration, medians)", "", ATTN_NOTE, "",
             f"{st.get('dtype')}, grad={st.get('grad')}, {st.get('warmup')} warm-up, {st.get('iters')} iterations "
             f"synchronised and {st.get('rounds')} back-to-back rounds of {st.get('iters')}, arms interleaved.", "",
             "| shape (B, T, H/Hkv, D) | family | mode | GQA | " +
             " | ".join(f"{a} {k}" for a in ATTN_ARMS for k in ("b2b", "kernels")) + " | " +
             " | ".join(f"fused/van {k}" for k in kinds) + " | fused-sdpa/van b2b |",
             "|---|---|---|---|" + "---|" * (2 * len(ATTN_ARMS) + len(kinds) + 1)]
    for s in sec.get("shapes", {}).values():
        if "error" in s and "arms" not in s:
            lines.append(f"| ({s['B']}, {s['T']}, {s['H']}/{s['H_kv']}, {s['D']}) | error | | | "
                         + " | " * (2 * len(ATTN_ARMS) + len(kinds)) + " |")
            continue
        arms, r = s.get("arms", {}), s.get("ratios", {})
        fk = s.get("fused_kernels")
        fam = s["family"] + (f" (fused: {fk})" if fk and fk not in (s["family"], "math") else "")
        lines.append(f"| ({s['B']}, {s['T']}, {s['H']}/{s['H_kv']}, {s['D']}) | {fam} | {s['mode']} | {s['gqa']} | "
                     + " | ".join(_ms(arms.get(a), k) for a in ATTN_ARMS for k in ("b2b", "kernels")) + " | "
                     + " | ".join(_r(r.get(k, {}).get("fused")) for k in kinds) + " | "
                     + _r(r.get("b2b", {}).get("fused-sdpa")) + " |")
    lines.append("")
    prof = [(n, a, r["kernels"]) for n, s in sec.get("shapes", {}).items() for a, r in s.get("arms", {}).items()
            if isinstance(r, dict) and isinstance(r.get("kernels"), dict) and r["kernels"].get("top")]
    if prof:
        lines += ["Top GPU kernels per step (torch.profiler):", "", "| case | arm | total ms | top kernels |",
                  "|---|---|---|---|"]
        for n, a, p in prof:
            top = "<br>".join(f"{t['ms_per_step']:.3f} ms × {t['calls_per_step']:g}: `{t['kernel'][:60]}`"
                              for t in p["top"][:4])
            lines.append(f"| {n} | {a} | {p['total_ms_per_step']:.3f} | {top} |")
        lines.append("")
    return lines


def _interleaving(sec: dict) -> str:
    """The arms each case timed interleaved (`kvshift.bench.generate.time_interleaved`): a group is named
    where all its arms are still there, measured by the same run."""
    parts = []
    for name, c in sec["cases"].items():
        arms, runs = c.get("arms", {}), c.get("arm_runs", {})
        groups = []
        for a, r in arms.items():
            group = [a] + list(r.get("interleaved_with", []) if isinstance(r, dict) else [])
            if (len(group) > 1 and all(b in arms for b in group) and len({runs.get(b) for b in group}) == 1
                    and set(group) not in [set(g) for g in groups]):
                groups.append(group)
        parts += [f"{name}: {', '.join(g)}" for g in groups]
    if not parts:
        return ""
    return (" Timed interleaved (each timed iteration ran every arm of a group once, in an order rotated from "
            "iteration to iteration, so a drift of the host's speed falls on all of them): " + "; ".join(parts)
            + ". Other arms were timed one after another.")


def render_generate(sec: dict | None) -> list[str]:
    if not sec or not sec.get("cases"):
        return []
    st = sec.get("settings", {})
    arms = [a for a in GEN_ARMS if any(a in c.get("arms", {}) for c in sec["cases"].values())]
    lines = [f"## Decoding through generate, {sec.get('model')}, {sec.get('new_tokens')} new tokens "
             "(ms per generated token, median)", "",
             "lm-*: `kvshift.LM.generate` (our KVCache, the fused decode kernel); hf-*: `KVShiftForCausalLM.generate` "
             "on transformers' StaticCache (shifted on read); llama-*: transformers' `LlamaForCausalLM` of the same "
             "shape (random weights, SDPA); lm-*-compiled: `LM.generate(compile=True)` (the static-shape decode step, "
             "torch.compile with CUDA graphs); hf-/llama-*-compiled: transformers' own compile of the decode step. "
             f"Per token = (t(N new) - t(1 new)) / (N - 1), prefill excluded; {st.get('warmup')} warm-up + "
             f"{st.get('iters')} timed calls of each, greedy, bf16. Target: every ratio in bold <= 1.02."
             + _interleaving(sec), "",
             "| batch | prompt | " + " | ".join(arms) + " | " +
             " | ".join((f"**{k}**" if k in GEN_TARGET_RATIOS else k) + f" ({GEN_RATIOS[k][0]} / {GEN_RATIOS[k][1]})"
                        for k in GEN_RATIOS) + " |",
             "|---|---|" + "---|" * (len(arms) + len(GEN_RATIOS))]
    for c in sec["cases"].values():
        cells = []
        for a in arms:
            r = c.get("arms", {}).get(a)
            cells.append("–" if r is None else "error" if "error" in r else f"{r['ms_per_token']:.3f}")
        prompt = f"{c['prompt']} (left-padded)" if c.get("padded") else f"{c['prompt']}"
        lines.append(f"| {c['batch']} | {prompt} | " + " | ".join(cells) + " | "
                     + " | ".join(_r(c.get("ratios", {}).get(k)) for k in GEN_RATIOS) + " |")
    lines.append("")
    cross = [f"{n}: {', '.join(c['cross_run_ratios'])}" for n, c in sec["cases"].items() if c.get("cross_run_ratios")]
    if cross:
        lines += ["Ratios of arms measured by different runs (merged; less comparable): " + "; ".join(cross) + ".", ""]
    return lines + render_decode_kernels(sec)


def render_decode_kernels(sec: dict | None) -> list[str]:
    """The kernels of one decode step per case and arm (--profile), only where an arm holds a profile."""
    prof = [(n, c, a, r) for n, c in (sec or {}).get("cases", {}).items() for a, r in c.get("arms", {}).items()
            if isinstance(r, dict) and isinstance(r.get("profile"), dict)]
    if not prof:
        return []
    new = sorted({p["new_tokens"] for *_, r in prof if "new_tokens" in (p := r["profile"])})
    kinds = sorted({p["kernels"] for *_, r in prof if "kernels" in (p := r["profile"])})
    lines = ["## GPU kernels of one decode step (torch.profiler, per generated token)", "",
             f"Two profiled generate calls after the timing, N = {'/'.join(map(str, new)) or '?'} new tokens and 1: "
             "per kernel, (calls and time with N - with 1) / (N - 1), so the prefill and the first token drop out "
             "(kernels that run as often in both calls are prefill kernels and are left out). "
             f"Kernels: {'; '.join(kinds) or '?'}. kernels/token: the kernels one decode step runs (at batch 1 "
             "decode is launch bound); launches/token: the host's kernel launches (graph: CUDA-graph replays).",
             "", "| case | arm | timed ms/token | kernel ms/token | kernels/token | launches/token (graph) | by family "
             "| top kernels (ms × calls per token) |", "|---|---|---|---|---|---|---|---|"]
    for n, c, a, r in prof:
        p = r["profile"]
        if "error" in p:
            lines.append(f"| {n} | {a} | {r['ms_per_token']:.3f} | profile error: `{p['error'][:80]}` | | | | |")
            continue
        launch = "–" if "launches_per_token" not in p else (f"{p['launches_per_token']:g} "
                                                            f"({p.get('graph_launches_per_token', 0):g})")
        fam = ", ".join(f"{k} {v:.3f}" for k, v in p["families_ms_per_token"].items())
        top = p.get("note") or "<br>".join(f"{t['ms_per_token']:.4f} × {t['calls_per_token']:g}: `{t['kernel'][:60]}`"
                                           for t in p["top"][:8])
        lines.append(f"| {n} | {a} | {r['ms_per_token']:.3f} | {p['ms_per_token']:.3f} | "
                     f"{p['kernels_per_token']:g} | {launch} | {fam} | {top} |")
    lines.append("")
    return lines
