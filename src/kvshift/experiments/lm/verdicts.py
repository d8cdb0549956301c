"""Verdicts of the language-model experiments: each is a pure function of the experiment's own runs."""

from __future__ import annotations

from kvshift.experiments.lm.spec import ARMS, PAIR
from kvshift.experiments.lm.stats import first_run, fit_power_law, fmt, mean_diff, si

# one seed: a variant must beat plain KV shift by more than this (nats) to count; about twice the seed
# spread of the 10M pair's difference (0.023, lm-seeds at gpu scale). With >= 2 seeds: twice the measured std.
VARIANT_NOISE = 0.05


def _pair_text(label: str, st: dict) -> str:
    v, k = first_run(st, "vanilla"), first_run(st, "kvshift")
    ps = next(iter(st["per_seed"].values())).get("kvshift", {})
    sp = ps.get("speedup")
    return (f"{label} ({si(v['non_embedding_params'])} params, {si(v['tokens'])} tokens, {v['epochs'] or 0:.1f} "
            f"epochs): vanilla {fmt(v['final_val_loss'])}, KV shift {fmt(k['final_val_loss'])} "
            f"(Δ {fmt(ps.get('diff'), '+.4f')}, speed-up {fmt(sp, '.2f', 'none')}{'×' if sp else ''}, below at "
            f"{fmt(ps.get('below_fraction'), '.0%')} of evals)")


def _pairs(stats: dict) -> dict:
    return {n: st for n, st in stats.items() if {"vanilla", "kvshift"} <= set(st["runs"])}


def verdict_main(stats: dict, scale: str) -> tuple[str, str, dict]:
    pairs = _pairs(stats)
    if not pairs:
        return "inconclusive", "only one arm has run so far: " + ", ".join(stats), {}
    diffs = [mean_diff(st, "kvshift") for st in pairs.values()]
    below = [ps["kvshift"].get("below_fraction") for st in pairs.values() for ps in st["per_seed"].values()
             if "kvshift" in ps]
    ok = [d is not None and d < 0 for d in diffs]
    verdict = ("reproduced" if all(ok) and all(b is not None and b >= 0.9 for b in below)
               else "partly reproduced" if any(ok) else "not reproduced")
    text = "; ".join(_pair_text(n, st) for n, st in pairs.items()) + ". One seed per size (spread: lm-seeds)."
    return verdict, text, {}


def verdict_seeds(stats: dict, scale: str) -> tuple[str, str, dict]:
    st = stats.get("10m")
    if st is None or "kvshift" not in st["aggregate"] or st["aggregate"]["kvshift"]["diff"]["n"] == 0:
        return "inconclusive", "no seed with both arms yet", {}
    agg = st["aggregate"]["kvshift"]
    d, sp, n, wins = agg["diff"], agg["speedup"], agg["diff"]["n"], agg["better_in"]
    verdict = "reproduced" if wins == n and n >= 3 else "partly reproduced" if d["mean"] < 0 else "not reproduced"
    per = ", ".join(f"{p['kvshift']['diff']:+.4f}" for p in st["per_seed"].values()
                    if p.get("kvshift", {}).get("diff") is not None)
    text = (f"KV shift − vanilla final val loss {d['mean']:+.4f} ± {d['std']:.4f} (n={n}; per seed {per}); KV shift "
            f"better in {wins}/{n} seeds; speed-up {fmt(sp['mean'], '.2f')} ± {fmt(sp['std'], '.2f')}× (n={sp['n']}; "
            f"a seed whose KV-shift arm never reaches vanilla's final loss has none).")
    return verdict, text, {"diff": d, "speedup": sp, "better_in": wins, "n": n}


FAIL_MARGIN = 1.0  # nats: a run that ends this far above the same arm's final loss at the reference rate failed


def lr_of(part: str) -> float:
    """"lr=0.01" or "lr=0.01-noclip" -> 0.01."""
    return float(part.split("=")[1].split("-")[0])


def reference_rate(stats: dict) -> float | None:
    """The rate failures are measured against: 1e-3 (the paper's small-scale setting) when it ran, else the
    lowest rate present."""
    rates = sorted({lr_of(k) for k in stats if "-" not in k})
    return 1e-3 if 1e-3 in rates else (rates[0] if rates else None)


def reference_losses(stats: dict, ref: float | None) -> dict[str, float]:
    """arm -> mean final validation loss at the reference learning rate (clipped, the default setting)."""
    st = stats.get(f"lr={ref:g}") if ref is not None else None
    if st is None:
        return {}
    return {a: st["aggregate"][a]["final_val_loss"]["mean"] for a in st["runs"]
            if st["aggregate"][a]["final_val_loss"]["mean"] is not None}


def lr_failures(st: dict, ref: dict[str, float], above_ref: bool = True) -> dict[str, dict[str, bool]]:
    """arm -> seed -> failed: the trainer's divergence (non-finite, or loss > 3x its running minimum), no final
    loss, or, at a rate above the reference (`above_ref`), a final validation loss more than FAIL_MARGIN above
    the same arm's at the reference rate (below it, a high loss is slow learning, not instability)."""
    out = {}
    for arm, by_seed in st["runs"].items():
        out[arm] = {seed: bool(r["diverged"] or r["final_val_loss"] is None
                               or (above_ref and arm in ref and r["final_val_loss"] > ref[arm] + FAIL_MARGIN))
                    for seed, r in by_seed.items()}
    return out


def verdict_lr(stats: dict, scale: str) -> tuple[str, str, dict]:
    ref_lr = reference_rate(stats)
    ref = reference_losses(stats, ref_lr)
    rows, better, parts_txt = {}, [], []
    for name, st in stats.items():
        if not {"vanilla", "kvshift"} <= set(st["runs"]):
            continue
        fail = lr_failures(st, ref, above_ref=ref_lr is not None and lr_of(name) > ref_lr)
        nf = {a: sum(fail[a].values()) for a in PAIR}
        ns = {a: len(fail[a]) for a in PAIR}
        dv = {a: st["aggregate"][a]["diverged"] for a in PAIR}
        both_ok = [sd for sd in fail["kvshift"] if sd in fail["vanilla"] and not fail["kvshift"][sd] and not fail["vanilla"][sd]]
        diffs = [st["per_seed"][sd]["kvshift"]["diff"] for sd in both_ok]
        d = sum(diffs) / len(diffs) if diffs else None
        # better: lower mean final loss over the seeds where neither failed, else the lower failure rate
        b = (d < 0) if d is not None else (nf["vanilla"] / ns["vanilla"] > nf["kvshift"] / ns["kvshift"])
        better.append(b)
        rows[name] = {"diff": d, "failed": nf, "diverged": dv, "seeds": ns, "kvshift_better": b,
                      "final_val_loss": {a: st["aggregate"][a]["final_val_loss"]["mean"] for a in PAIR}}
        finals = {a: [r["final_val_loss"] for r in st["runs"][a].values() if r["final_val_loss"] is not None]
                  for a in PAIR}
        rng = {a: (f"{min(v):.3f}" if len(v) == 1 else f"{min(v):.3f}–{max(v):.3f}") if v else "—"
               for a, v in finals.items()}
        parts_txt.append(f"{name}: Δ {fmt(d, '+.3f')}, final val loss vanilla {rng['vanilla']} vs KV shift "
                         f"{rng['kvshift']}, failed vanilla {nf['vanilla']}/{ns['vanilla']} (diverged "
                         f"{dv['vanilla']}), KV shift {nf['kvshift']}/{ns['kvshift']} (diverged {dv['kvshift']})")
    if not rows or not ref:
        return "inconclusive", "no learning rate with both arms yet, or no reference run", {}
    top_lr = max(lr_of(k) for k in rows)
    tops = {k: v for k, v in rows.items() if lr_of(k) == top_lr}
    claim = {k: v["failed"]["vanilla"] == v["seeds"]["vanilla"] and v["failed"]["kvshift"] == 0 for k, v in tops.items()}
    rates = {lr_of(k) for k in rows}
    better_rates = sum(all(rows[k]["kvshift_better"] for k in rows if lr_of(k) == r) for r in rates)
    verdict = ("reproduced" if better_rates == len(rates) and any(claim.values()) and len(rates) >= 4
               else "partly reproduced" if any(claim.values()) or better_rates > len(rates) / 2 else "not reproduced")
    text = "; ".join(parts_txt) + (
        f". KV shift better at {better_rates}/{len(rates)} learning rates. A run failed when it diverged or, above lr "
        f"{ref_lr:g}, ended more than {FAIL_MARGIN:g} nat above the same arm's final loss at lr {ref_lr:g} (vanilla {ref.get('vanilla', 0):.3f}, "
        f"KV shift {ref.get('kvshift', 0):.3f}); at lr {top_lr:g} every vanilla seed failed and no KV-shift seed did: "
        + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in claim.items()) + ".")
    return verdict, text, {"by_lr": rows, "fail_margin_nats": FAIL_MARGIN, "reference_lr": ref_lr,
                           "reference_final_val_loss": ref, "top_lr_claim": claim}


def verdict_scaling(stats: dict, scale: str) -> tuple[str, str, dict]:
    sizes = {}
    for name, st in _pairs(stats).items():
        sizes[name] = {a: {"params": first_run(st, a)["non_embedding_params"],
                           "val_loss": st["aggregate"][a]["final_val_loss"]["mean"]} for a in PAIR}
    if not sizes:
        return "inconclusive", "no size with both arms yet", {}
    order = sorted(sizes, key=lambda s: sizes[s]["vanilla"]["params"])
    fits = {}
    for a in PAIR:
        pts = [(sizes[s][a]["params"], sizes[s][a]["val_loss"]) for s in order if sizes[s][a]["val_loss"] is not None]
        if len(pts) >= 2:
            fits[a] = {"log_linear": fit_power_law(*zip(*pts))}
        if len(pts) >= 4:
            fits[a]["with_offset"] = fit_power_law(*zip(*pts), offset=True)
    gaps = {s: sizes[s]["kvshift"]["val_loss"] - sizes[s]["vanilla"]["val_loss"] for s in order}
    wins = sum(g < 0 for g in gaps.values())
    span = sizes[order[-1]]["vanilla"]["params"] / sizes[order[0]]["vanilla"]["params"]
    verdict = ("reproduced" if wins == len(gaps) and len(gaps) >= 4
               else "partly reproduced" if wins else "not reproduced")
    fit_txt = ", ".join(f"{a} L ≈ {f['log_linear']['a']:.3g}·N^-{f['log_linear']['b']:.3f}" for a, f in fits.items())
    text = (f"KV shift below vanilla at {wins}/{len(gaps)} sizes spanning {span:.0f}× ("
            + ", ".join(f"{s}: Δ {g:+.3f}" for s, g in gaps.items()) + f"); {fit_txt}.")
    return verdict, text, {"sizes": sizes, "fits": fits, "gaps": gaps, "span": span}


def verdict_variants(stats: dict, scale: str) -> tuple[str, str, dict]:
    st = stats.get("10m")
    loss = {a: st["aggregate"][a]["final_val_loss"]["mean"] for a in st["runs"]} if st else {}
    if "kvshift" not in loss:
        return "inconclusive", "plain KV shift has not run yet", {"final_val_loss": loss}
    # the noise scale: twice the seed spread of plain KV shift's final loss when there are >= 2 seeds, else
    # VARIANT_NOISE
    ks = [r["final_val_loss"] for r in st["runs"]["kvshift"].values() if r["final_val_loss"] is not None]
    if len(ks) >= 2:
        mean = sum(ks) / len(ks)
        tol, src = max(0.005, 2 * (sum((x - mean) ** 2 for x in ks) / (len(ks) - 1)) ** 0.5), "2 x seed std"
    else:
        tol, src = VARIANT_NOISE, "one seed: a fixed noise margin"
    ref = loss["kvshift"]
    rel = {a: (v - ref if v is not None else None) for a, v in loss.items()}
    beaten = [a for a, d in rel.items() if d is not None and d < -tol]
    sides = [a for a in ("kshift", "vshift") if a in rel]
    sides_matter = bool(sides) and all(rel[a] is None or rel[a] > 0 for a in sides)
    windows_no_help = all(rel[a] is None or rel[a] >= -tol for a in ("window2", "window3") if a in rel)
    held = [not beaten, sides_matter, windows_no_help]
    verdict = ("reproduced" if all(held) and len(loss) == len(ARMS)
               else "partly reproduced" if any(held) else "not reproduced")
    text = (f"final val loss relative to plain KV shift ({ref:.4f}): "
            + ", ".join(f"{a} {fmt(d, '+.4f')}" for a, d in rel.items() if a != "kvshift")
            + f"; beating it by > {tol:.3f} ({src}): {', '.join(beaten) or 'none'}.")
    return verdict, text, {"final_val_loss": loss, "relative_to_kvshift": rel, "tolerance": tol, "beaten_by": beaten}


def verdict_gqa(stats: dict, scale: str) -> tuple[str, str, dict]:
    verdict, text, extra = verdict_main(stats, scale)
    k = first_run(stats["50m-gqa"], "kvshift") if "kvshift" in stats.get("50m-gqa", {}).get("runs", {}) else {}
    return verdict, text.replace("50m-gqa (", f"GQA {k.get('n_heads')} heads / {k.get('n_kv_heads')} KV heads ("), extra


VERDICT_FNS = {"lm-main": verdict_main, "lm-seeds": verdict_seeds, "lm-lr": verdict_lr, "lm-scaling": verdict_scaling,
            "lm-variants": verdict_variants, "lm-gqa": verdict_gqa}


