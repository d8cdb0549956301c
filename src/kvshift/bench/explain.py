"""Why each missed target was missed, from the measurements and profiles the result itself holds.

Every line is computed, never written by hand: a block target sets the two arms' GPU kernel times beside the
time an iteration takes back to back beyond its kernels (host time the GPU waits for) and names the host
events the profiler charged most to the fused op; an end-to-end target compares the two arms' kernel
families and the time outside the kernels; an eager decode target is set beside the compiled step of the
same shape. Where the run holds no profile, the line says so and names the option that records one.

An end-to-end tokens/s target also gets the design's memory floor (`shift_floor`): the bytes the shift must
move beyond vanilla's at vanilla's memory, at the GPU's peak bandwidth."""

from __future__ import annotations

from kvshift.bench.report_parts import GEN_RATIOS


def _failed(*arms: dict) -> str | None:
    """'fused errored' etc. when an arm holds an error or was skipped, else None."""
    bad = [f"{n} {'errored' if 'error' in a else 'was skipped'}" for n, a in arms if isinstance(a, dict)
           and ('error' in a or 'skipped' in a)]
    return "; ".join(bad) or None


def _kernels(a: dict) -> float | None:
    return (a.get("kernels") or {}).get("total_ms_per_step")


def _host_top(a: dict, n: int = 2) -> str:
    top = ((a.get("kernels") or {}).get("host") or {}).get("top") or []
    ops = [t for t in top if "::" in t["event"] and not t["event"].startswith("aten::")] or top
    return ", ".join(f"`{t['event']}` {t['self_cpu_ms_per_step']:.2f} ms" for t in ops[:n])


def _attn(case: dict, bound: float) -> str:
    arms = case.get("arms", {})
    f, v = arms.get("fused", {}), arms.get("vanilla", {})
    if failed := _failed(("fused", f), ("vanilla", v)):
        return failed
    fb, vb = (f.get("b2b") or {}).get("median_ms"), (v.get("b2b") or {}).get("median_ms")
    fk, vk = _kernels(f), _kernels(v)
    if None in (fb, vb, fk, vk) or not vk > 0:
        return "no GPU kernels profiled in this case (the attn part profiles them on CUDA)"
    kr = fk / vk
    parts = [f"GPU kernels fused {fk:.3f} vs vanilla {vk:.3f} ms ({kr:.3f}); back-to-back median minus the kernels' "
             f"sum (separate measurements: near zero is noise, more is time the GPU waits on the host) fused "
             f"{fb - fk:.3f} vs vanilla {vb - vk:.3f} ms"]
    host = _host_top(f)
    if fb - fk > vb - vk and host:
        parts.append(f"host self time of the fused op under the profiler: {host}")
    if kr > bound:
        names = {u["kernel"] for u in (v.get("kernels") or {}).get("top", [])}
        extra = [t["kernel"][:40] for t in (f.get("kernels") or {}).get("top", [])
                 if t["kernel"] not in names and not t["kernel"].startswith("triton_")]
        parts.append("the kernels miss too: the shift's passes over K and V"
                     + (f" ({', '.join(f'`{e}`' for e in extra[:3])})" if extra else ""))
    return "; ".join(parts)


# HBM bandwidth (bytes/s, the vendors' figures) by the device name torch reports, for the memory floor; any other
# device (GH200, H100 NVL/PCIe, ...: other memories) gets no floor line
PEAK_BANDWIDTH = {"NVIDIA H200": 4.8e12, "NVIDIA H100 80GB HBM3": 3.35e12}
# Passes over one layer's K-sized tensor (B*T*H_kv*D elements) that a training step of the fused op makes
# beyond vanilla's, at vanilla's memory (only raw k and v kept): forward, v read and v̂ written (2; K's pass
# replaces vanilla's RoPE pass); backward, k̂ and v̂ recomputed (4), v̂'s gradient read, dv written and v read
# for the V coefficients (3; K's un-shift replaces vanilla's RoPE backward), k read for the K coefficients (1).
SHIFT_PASSES = 10


def shift_floor(model: dict, device: str) -> dict | None:
    """{bytes, ms, ratio}: the extra bytes per step the fused op must move (SHIFT_PASSES x one layer's K-sized
    bf16 tensor x layers), that time at the device's peak bandwidth, and the tokens/s ratio vanilla's step
    would allow with only that added; None without the model's preset, vanilla's step or a known device."""
    from kvshift.models import ModelConfig

    bw = PEAK_BANDWIDTH.get((device or "").strip())
    vs = ((model.get("arms", {}).get("vanilla") or {}).get("step") or {}).get("median_ms")
    if bw is None or not vs or not model.get("preset") or not model.get("batch") or not model.get("seq_len"):
        return None
    try:
        cfg = ModelConfig.from_name(model["preset"], **(model.get("overrides") or {}))
    except (KeyError, ValueError, TypeError):
        return None
    unit = model["batch"] * model["seq_len"] * cfg.n_kv_heads * (cfg.dim // cfg.n_heads) * 2
    extra = SHIFT_PASSES * unit * cfg.n_layers
    ms = extra / bw * 1e3
    return {"bytes": extra, "unit_bytes": unit, "ms": ms, "ratio": vs / (vs + ms), "bandwidth": bw}


def _floor_text(model: dict, device: str) -> str | None:
    fl = shift_floor(model, device)
    fs = ((model.get("arms", {}).get("fused") or {}).get("step") or {}).get("median_ms")
    vs = ((model.get("arms", {}).get("vanilla") or {}).get("step") or {}).get("median_ms")
    if fl is None or fs is None:
        return None
    return (f"memory floor of the design: {SHIFT_PASSES} extra passes of {fl['unit_bytes'] / 1e6:.0f} MB per layer, "
            f"{fl['bytes'] / 1e9:.2f} GB per step, {fl['ms']:.2f} ms at {fl['bandwidth'] / 1e12:.3g} TB/s (tokens/s "
            f"ratio <= {fl['ratio']:.4f} from bytes alone); the step measured {fs - vs:+.2f} ms")


def _e2e(model: dict, device: str = "") -> str:
    floor = _floor_text(model, device)
    return "; ".join(x for x in (_e2e_kernels(model), floor) if x)


def _e2e_kernels(model: dict) -> str:
    arms = model.get("arms", {})
    if failed := _failed(("fused", arms.get("fused")), ("vanilla", arms.get("vanilla"))):
        return failed
    f, v = (arms.get("fused") or {}).get("profile") or {}, (arms.get("vanilla") or {}).get("profile") or {}
    if not f.get("families_ms_per_step") or not v.get("families_ms_per_step"):
        return "not profiled in the run that measured it (`kvshift bench --only e2e --models <model> --profile`)"
    ff, vf = f["families_ms_per_step"], v["families_ms_per_step"]
    diff = sorted(((k, ff.get(k, 0.0) - vf.get(k, 0.0)) for k in set(ff) | set(vf)), key=lambda x: -x[1])
    fs, vs = (arms["fused"].get("step") or {}).get("median_ms"), (arms["vanilla"].get("step") or {}).get("median_ms")
    out = [f"kernels {f['total_ms_per_step']:.2f} vs {v['total_ms_per_step']:.2f} ms per step; by family "
           + ", ".join(f"{k} {d:+.2f}" for k, d in diff[:3])]
    if fs is not None and vs is not None:
        out.append(f"step median minus the kernels' sum (separate measurements) {fs - f['total_ms_per_step']:.2f} "
                   f"vs {vs - v['total_ms_per_step']:.2f} ms")
    return "; ".join(out)


def _mem(model: dict) -> str:
    arms = model.get("arms", {})
    fb, vb = (arms.get("fused") or {}).get("peak_mem_bytes"), (arms.get("vanilla") or {}).get("peak_mem_bytes")
    if fb is None or vb is None:
        return "peak memory of an arm missing"
    return f"fused peaks {(fb - vb) / 2 ** 20:+.1f} MiB from vanilla's {vb / 2 ** 30:.2f} GiB"


def _generate(case: dict, ratio_name: str) -> str:
    arms = case.get("arms", {})
    ms = {a: r.get("ms_per_token") for a, r in arms.items() if isinstance(r, dict) and r.get("ms_per_token")}
    num, den = GEN_RATIOS.get(ratio_name.removesuffix("_ratio"), (None, None))
    if num in ms and den in ms and num.endswith("-compiled"):
        pn, pd = (arms[num].get("profile") or {}), (arms[den].get("profile") or {})
        if not pn.get("kernels_per_token") or not pd.get("kernels_per_token"):
            return (f"{num} {ms[num]:.3f} vs {den} {ms[den]:.3f} ms per token; not profiled in the run that "
                    "measured it (`--profile`)")
        return (f"{num} {ms[num]:.3f} vs {den} {ms[den]:.3f} ms per token; GPU kernels {pn['ms_per_token']:.3f} vs "
                f"{pd['ms_per_token']:.3f} ms in {pn['kernels_per_token']:g} vs {pd['kernels_per_token']:g} "
                "kernels per token")
    compiled = {a: m for a, m in ms.items() if a.endswith("-compiled")}
    pair = ", ".join(f"{a} {ms[a]:.2f}" for a in (num, den) if a in ms)
    if not pair:
        return _failed(*((a, arms.get(a)) for a in (num, den))) or "neither arm of this ratio has a timing"
    if not compiled:
        return f"eager steps ({pair} ms per token); no compiled arm in this case" + _spread(arms, num, den)
    best = min(compiled, key=compiled.get)
    eager = min(ms[a] for a in (num, den) if a in ms)
    return (f"eager steps ({pair} ms per token) against {compiled[best]:.2f} ms for {best}, the compiled step of "
            f"the same shape on the same GPU ({compiled[best] / eager:.0%} of the faster eager step): the rest of "
            "an eager step is host time, which this ratio compares; the compiled ratios measure the GPU"
            + _spread(arms, num, den))


SPREAD_MIN_ITERS = 5  # timed iterations per arm below which a p10-p90 range says nothing


def _spread(arms: dict, num: str, den: str) -> str:
    """The two arms' per-token times over the timed iterations (p10-p90), and whether those per-iteration
    ranges overlap; only with SPREAD_MIN_ITERS or more iterations of each."""
    r = [arms.get(a) or {} for a in (num, den)]
    if not all("p10_ms" in x and "p90_ms" in x and x.get("n", 0) >= SPREAD_MIN_ITERS for x in r):
        return ""
    lap = r[0]["p10_ms"] <= r[1]["p90_ms"] and r[1]["p10_ms"] <= r[0]["p90_ms"]
    return (f"; per timed iteration (p10-p90 of {min(x['n'] for x in r)}+) {num} {r[0]['p10_ms']:.2f}-"
            f"{r[0]['p90_ms']:.2f} vs {den} {r[1]['p10_ms']:.2f}-{r[1]['p90_ms']:.2f} ms: "
            + ("the per-iteration ranges overlap" if lap else "the per-iteration ranges are apart"))


def explain_missed(results: dict, targets: dict[str, dict]) -> list[str]:
    """One markdown bullet per missed target."""
    device = (results.get("meta") or {}).get("device", "")
    lines = []
    for key, t in targets.items():
        if t.get("met") is not False:
            continue
        part, case, what = key.split("/", 2)
        coll = {"attn": "shapes", "e2e": "models", "generate": "cases"}.get(part)
        c = results.get(part, {}).get(coll, {}).get(case, {}) if coll else {}
        if part == "attn":
            why = _attn(c, t["target"])
        elif part == "e2e" and what == "mfu":
            why = "MFU is the fused arm's own efficiency, not a comparison with vanilla: " + _e2e_kernels(c)
        elif part == "e2e":
            why = _mem(c) if what == "peak_mem_ratio" else _e2e(c, device)
        elif part == "generate":
            why = _generate(c, what)
        else:
            why = "no explanation rule for this part"
        lines.append(f"- {key} ({t['measured']:.4f} {t['op']} {t['target']}): {why}.")
    return lines
