"""Fig. 2: the Theorem 3 loss landscape over (alpha1, beta1) with alpha2 = 1 - alpha1, beta2 = 1 - beta1,
its gradient-descent streamlines for O(T) = 0, 10, 100, and gradient descent run from fixed starts."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from kvshift.experiments.base import Experiment, ResultsLog, RunOptions, write_summary
from kvshift.tasks.theorem3 import landscape_grid, loss
from kvshift.theory import (
    induction_head,
    induction_targets,
    random_embeddings,
    run_induction_head,
)
from kvshift.utils.plot import pyplot, save_figure
from kvshift.utils.provenance import provenance

OTS = (0.0, 10.0, 100.0)
STARTS = ((0.5, 0.5), (0.9, 0.1), (0.2, 0.8), (0.8, 0.8))


def descend(a1: float, b1: float, OT: float, lr: float, steps: int) -> list[tuple[float, float, float]]:
    """Projected gradient descent on [0, 1]^2 of the constrained loss; returns (a1, b1, L) per step."""
    p = torch.tensor([a1, b1], dtype=torch.float64, requires_grad=True)
    path = []
    for _ in range(steps + 1):
        L = loss(p[0], 1 - p[0], p[1], 1 - p[1], OT)
        q = p.detach()
        path.append((float(q[0]), float(q[1]), float(L.detach())))
        (g,) = torch.autograd.grad(L, p)
        with torch.no_grad():
            p -= lr * g
            p.clamp_(0.0, 1.0)
    return path


def landscape(opts: RunOptions, out: Path) -> dict:
    scale, steps = opts.scale, opts.steps
    plt = pyplot()

    t0 = time.time()
    steps = steps or 2000
    rd = ResultsLog(out)
    fig, axes = plt.subplots(1, len(OTS), figsize=(5.2 * len(OTS), 4.6))
    per_ot = {}
    for ax, OT in zip(axes, OTS):
        a1, b1, L, ga, gb = landscape_grid(101, OT)
        cs = ax.contour(a1.numpy(), b1.numpy(), L.numpy(), levels=20, cmap="viridis")
        ax.clabel(cs, inline=True, fontsize=6, fmt="%.3f")
        ax.streamplot(a1.numpy(), b1.numpy(), (-ga).numpy(), (-gb).numpy(), color="0.5", density=1.0, linewidth=0.6)
        ends = []
        for s in STARTS:
            path = descend(*s, OT, lr=1.0, steps=steps)
            for i, (x, y, lv) in enumerate(path[:: max(1, steps // 100)]):
                rd.log({"OT": OT, "start": s, "step": i * max(1, steps // 100), "alpha1": x, "beta1": y, "loss": lv})
            ax.plot([q[0] for q in path], [q[1] for q in path], "r-", lw=1)
            ax.plot(*s, "ro", ms=3)
            near = next((i for i, q in enumerate(path) if q[0] <= 0.1 and q[1] >= 0.9), None)
            ends.append({"start": s, "end": path[-1][:2], "final_loss": path[-1][2], "steps_to_near_induction": near})
        ax.plot(0, 1, "k*", ms=12)
        ax.set(title=f"O(T) = {OT:g}", xlabel="α1 (α2 = 1 − α1)", ylabel="β1 (β2 = 1 − β1)")
        gnorm = (ga ** 2 + gb ** 2).sqrt()
        vals = {k: float(loss(a, 1 - a, b, 1 - b, OT)) for k, (a, b) in
                {"induction (0,1)": (0.0, 1.0), "(0.5,0.5)": (0.5, 0.5), "(1,0)": (1.0, 0.0)}.items()}
        argmin = int(L.argmin())
        per_ot[str(OT)] = {"loss_at": vals, "grid_argmin": [float(a1.flatten()[argmin]), float(b1.flatten()[argmin])],
                           "mean_grad_norm": float(gnorm.mean()), "gradient_descent": ends}
    fig.suptitle("Theorem 3 loss: contours and gradient-descent streamlines (★ = induction solution)")
    save_figure(fig, f"{out}/plot.png", dpi=110)
    rd.close()
    minima_ok = all(v["grid_argmin"][0] <= 0.05 and v["grid_argmin"][1] >= 0.95 for v in per_ot.values())
    flatter = [per_ot[str(o)]["mean_grad_norm"] for o in OTS]
    def reach(o, i):
        v = per_ot[str(o)]["gradient_descent"][i]["steps_to_near_induction"]
        return str(v) if v is not None else f"never in {steps}"
    monotone = all(a > b for a, b in zip(flatter, flatter[1:]))
    verdict = "reproduced" if minima_ok and monotone else "partly reproduced" if minima_ok or monotone else "not reproduced"
    text = (f"the grid minimum is at the induction solution (0, 1) for every O(T): {minima_ok}; mean gradient norm "
            + " > ".join(f"{g:.2e}" for g in flatter) + f" for O(T) = {', '.join(f'{o:g}' for o in OTS)} "
            f"(larger O(T) flattens the landscape: {monotone}). Steps of gradient descent (lr 1) to reach α1 ≤ 0.1, β1 ≥ 0.9, "
            "by O(T) = " + "/".join(f"{o:g}" for o in OTS) + ": " + "; ".join(
                f"from {st}: " + " / ".join(reach(o, i) for o in OTS) for i, st in enumerate(STARTS)) + ".")
    summary = {"experiment": "landscape", "scale": scale, **provenance(), "paper":
               "Fig. 2: the landscape leads to the induction solution (alpha1, beta1) = (0, 1); larger O(T) flattens it "
               "(slower learning).", "ots": list(OTS), "per_ot": per_ot, "verdict": verdict, "verdict_text": text,
               "wall_seconds": time.time() - t0}
    write_summary(out, summary)
    with open(f"{out}/README.md", "w") as f:
        f.write(f"""# Theorem 3 landscape (paper Fig. 2)

Command: `{summary['command']}`
Commit: `{summary['git_commit']}` · device: {summary['device']} · torch {summary['torch']}

**Paper:** {summary['paper']}

**Ours:** the closed-form loss of Theorem 3 (docs/paper.md) over a 101×101 grid; streamlines follow −∇L of the
constrained function (autograd); red paths are projected gradient descent (lr 1, {steps} steps).

**Verdict:** **{verdict}** — {text}

| O(T) | L at (0,1) | L at (0.5,0.5) | L at (1,0) | grid argmin | mean ‖∇L‖ |
|---|---|---|---|---|---|
""" + "\n".join(f"| {o} | {v['loss_at']['induction (0,1)']:.4f} | {v['loss_at']['(0.5,0.5)']:.4f} | {v['loss_at']['(1,0)']:.4f} | "
                 f"({v['grid_argmin'][0]:.2f}, {v['grid_argmin'][1]:.2f}) | {v['mean_grad_norm']:.2e} |" for o, v in per_ot.items())
                + "\n\n![plot](plot.png)\n")
    return summary


def theorem2(opts: RunOptions, out: Path) -> dict:
    scale = opts.scale
    t0 = time.time()
    rows = []
    for dim, vocab, length in ((64, 32, 64), (256, 64, 128), (512, 256, 256)):
        g = torch.Generator().manual_seed(dim)
        emb = random_embeddings(vocab, dim, g)
        tokens = torch.randint(0, vocab, (16, length), generator=g)
        tgt = induction_targets(tokens)
        m = tgt >= 0
        res = {"dim": dim, "vocab": vocab, "length": length, "targets": int(m.sum())}
        for kind in ("kvshift", "vanilla"):
            pred = run_induction_head(induction_head(dim, attention=kind, max_len=length), emb, tokens)
            res[f"{kind}_accuracy"] = float((pred[m] == tgt[m]).float().mean())
        rows.append(res)
    exact = all(r["kvshift_accuracy"] == 1.0 for r in rows)
    van = max(r["vanilla_accuracy"] for r in rows)
    text = ("KV-shift construction (α1=0, α2=1, β1=1, β2=0, identity projections, ALiBi): accuracy "
            + ", ".join(f"{r['kvshift_accuracy']:.3f} (d={r['dim']})" for r in rows)
            + f"; the same weights with vanilla attention: at most {van:.3f}.")
    summary = {"experiment": "theorem2", "scale": scale, **provenance(), "paper": "Theorem 2", "rows": rows,
               "verdict": "reproduced" if exact and van < 0.2 else "not reproduced", "verdict_text": text,
               "wall_seconds": time.time() - t0}
    write_summary(out, summary)
    with open(f"{out}/README.md", "w") as f:
        f.write(f"# Theorem 2: one KV-shift layer is an induction head\n\nCommand: `{summary['command']}`\n"
                f"Commit: `{summary['git_commit']}`\n\n**Verdict:** **{summary['verdict']}** — {text}\n\n"
                "Random near-orthogonal unit embeddings, 16 random sequences per setting; the prediction is the "
                "embedding nearest to the layer's output; targets are the tokens after the latest earlier occurrence.\n")
    return summary


EXPERIMENTS = [
    Experiment(
        "theorem2", "Thm. 2", "One layer, one head of KV shifting attention represents an induction head exactly.",
        "reproduced: the construction predicts every induction target (accuracy 1.0 at every size) and the same "
        "weights with vanilla attention stay below 20%; not reproduced otherwise.",
        "Thm. 2: the one-layer KV-shift construction is an exact induction head; vanilla is not", theorem2),
    Experiment(
        "landscape", "Fig. 2", "Theorem 3's loss landscape leads to the induction solution; larger O(T) flattens it.",
        "reproduced: the grid minimum is at the induction solution (0, 1) for every O(T) and the mean gradient norm "
        "falls as O(T) grows; partly: one of the two; not reproduced otherwise.",
        "Fig. 2: Theorem 3 loss landscape and gradient-descent streamlines for O(T) = 0, 10, 100", landscape),
]
