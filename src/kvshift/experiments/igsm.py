"""iGSM grade-school math (paper App. I): train on problems of at most N operations, test on more.

Every arm trains through the one trainer (`kvshift.experiments.arms.train_arm`): rows are
`<bos> question <sep> solution <eos>` and the labels keep only the solution tokens and `<eos>` (the loss
is next-token cross-entropy on the solution). The trainer's evaluator is the teacher-forced accuracy on
held-out problems; after training, every arm is scored by greedy decoding. Fairness: every arm of a seed
trains on one shared DataStream (data seed 1000 + s) from the same shared initial weights (init seed s),
with the same steps, batch, optimiser and schedule. Each (setting, arm, seed) is published into out/runs/ and
the summary is built from every published run, so split jobs merge.
"""

from __future__ import annotations

import functools
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvshift.experiments import igsm_report, toy_runs
from kvshift.experiments.igsm_report import (  # noqa: F401 - the verdict, here under its old names too
    ARMS, ID_LEARNED, MIN_SEEDS, PAPER_SETTINGS, igsm_verdict, ood_difference)
from kvshift.experiments.arms import (
    EVAL_SEED,
    DataStream,
    StreamSource,
    TrainSpec,
    default_device,
    train_arm,
)
from kvshift.experiments.base import Experiment, ResultsLog, RunOptions, write_summary
from kvshift.models import LM, ModelConfig
from kvshift.tasks import igsm
from kvshift.train.checkpoint import latest_checkpoint, load_checkpoint
from kvshift.utils.io import read_json, read_jsonl
from kvshift.utils.provenance import command_line, provenance


# iGSM. Each scale lists its settings (train n_ops uniform in 1..train_ops, test exactly test_ops) with their own
# row length, steps and batch over the scale's shared model and optimiser; `--only Tr6-Te8` picks one.
# gpu Tr12-Te15 (the paper's split): 6 layers x 384, rows <= 768 tokens, 3000 steps of batch 64; measured 132-159 s
# per arm on an H200 (19-23 steps/s), but only 0.13/0.16 in-distribution answer accuracy.
# gpu Tr6-Te8 (smaller than the paper's): Tr6 rows measured <= 436 tokens (p99.9 392, mean 205; 20k problems), so
# rows of 448; Te8 solutions <= ~250 tokens. Budget, an ESTIMATE, not a measurement: 6000 steps of batch 128 (768k
# rows, 4x the Tr12 run's); at the Tr12 run's ~1.1 us per batch token, Tr6 batches (~128 x 370 tokens) take
# ~45-60 ms/step: 270-370 s of training plus ~60-90 s of data (Tr12's 192k rows: 14 s), scoring and start-up:
# one (arm, seed) per <= 9-minute device command (experiment.sh's 540 s BUDGET), ~6-8 min, with margin. That 768k rows reach 0.8
# in-distribution answer accuracy is a guess too (Tr12 was still learning at 192k rows); if not, the verdict
# says inconclusive with the budget reached. Tr21-Te24 needs rows of ~1250 tokens and more steps than one
# command holds. cpu: Tr3-Te4, 3 layers x 96, too few steps to learn mod-23 arithmetic (a probe at Tr2-Te3,
# 1200 x 32 rows, 9 min on one core: KV shift in-dist answer acc. 0.083, token acc. 0.75): answers near chance.
# gpu Tr6-Te8-long: the same split at 3x the steps (a setting's `name` keeps its runs apart from the 6000-step
# ones). Measured at 6000 steps: 241-261 s of training per arm, in-distribution answer accuracy 0.43-0.77 and
# still rising, so no run reached the 0.8 bar; 18000 steps (~750 s of training) is a guess at what does. Two
# device calls per arm: the first is cut at experiment.sh's budget, the second resumes from its checkpoint.
IGSM = {
    "gpu": dict(settings=(dict(train_ops=12, test_ops=15, seq=768, steps=3000, batch=64),
                          dict(train_ops=6, test_ops=8, seq=448, steps=6000, batch=128, eval_every=1000),
                          dict(name="Tr6-Te8-long", train_ops=6, test_ops=8, seq=448, steps=18000, batch=128,
                               eval_every=2000)),
                dim=384, heads=6, n_layers=6, ffn=1024, lr=1e-3, warmup=200, eval_every=500, n_test=512, n_id=256,
                gen_batch=128, bf16=True, threads=None),
    "cpu": dict(settings=(dict(train_ops=3, test_ops=4, seq=256, steps=400, batch=12),),
                dim=96, heads=4, n_layers=3, ffn=256, lr=3e-3, warmup=40, eval_every=100, n_test=96, n_id=96,
                gen_batch=96, bf16=False, threads=1),
}


def setting_key(st: dict) -> str:
    """A setting's name: its own `name`, else Tr<train ops>-Te<test ops>."""
    return st.get("name") or f"Tr{st['train_ops']}-Te{st['test_ops']}"


def settings(scale: str, only: list[str] | None = None) -> list[dict]:
    """The scale's settings (each merged over the scale's shared values), those named by --only if given."""
    s = IGSM[scale]
    out = [{**{k: v for k, v in s.items() if k != "settings"}, **st} for st in s["settings"]]
    if only:
        unknown = sorted(set(only) - {setting_key(st) for st in out})
        if unknown:
            raise ValueError(f"--only: the {scale} settings of igsm are {[setting_key(st) for st in out]}, got {unknown}")
        out = [st for st in out if setting_key(st) in only]
    return out


def _spec(s: dict, steps: int | None) -> TrainSpec:
    return TrainSpec(steps=steps or s["steps"], batch_size=s["batch"], lr=s["lr"], warmup=s["warmup"],
                     eval_every=s["eval_every"], bf16=s["bf16"] and torch.cuda.is_available(), threads=s["threads"])


_TOK = igsm.IGSMTokenizer()


def _encode_problem(p: igsm.Problem) -> tuple[list[int], int]:
    """<bos> question <sep> solution <eos>, and the length of the prompt (through <sep>)."""
    q = [_TOK.bos_id] + _TOK.encode(p.question_text) + [_TOK.sep_id]
    return q + _TOK.encode(p.solution_text) + [_TOK.eos_id], len(q)


def _sample_igsm(max_ops, seq, batch, g):
    """Training rows right-padded to `seq` (longer problems are redrawn); mask[p] marks positions
    whose NEXT token is a solution token or <eos> (igsm.sample_batch's convention). int16 (the vocabulary has
    170 ids): a stream of 6000 x 128 rows of 448 is ~0.7 GB instead of 2.75 GB to build and hold."""
    rng = random.Random(int(torch.randint(0, 2 ** 62, (1,), generator=g)))
    tokens = torch.full((batch, seq), _TOK.pad_id, dtype=torch.int16)
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    for b in range(batch):
        while True:
            row, n_q = _encode_problem(igsm.generate(max_ops, rng=rng))
            if len(row) <= seq:
                break
        tokens[b, :len(row)] = torch.tensor(row)
        mask[b, n_q - 1:len(row) - 1] = True
    return tokens, mask


def igsm_batch(tokens: torch.Tensor, mask: torch.Tensor) -> dict:
    """The trainer's batch: the all-pad tail trimmed; labels only where the next token is a solution token or
    <eos> (-100 elsewhere: no loss)."""
    T = int((tokens != _TOK.pad_id).sum(1).max())
    tokens = tokens[:, :T].long()
    x = tokens[:, :-1].contiguous()
    labels = torch.where(mask[:, :T - 1], tokens[:, 1:], torch.full_like(tokens[:, 1:], -100)).contiguous()
    return {"input_ids": x, "labels": labels, "position_ids": torch.arange(x.shape[1]).expand_as(x)}


def igsm_eval_set(max_ops: int, n: int, exact: bool, seed: int) -> list[igsm.Problem]:
    rng = random.Random(seed)
    return [igsm.generate(max_ops, rng=rng, exact=exact) for _ in range(n)]


@torch.no_grad()
def teacher_forced(model, problems, device, batch: int = 32) -> dict:
    """Loss and next-token accuracy on the solution tokens (and <eos>) of the reference solutions."""
    loss = correct = n = 0.0
    for i in range(0, len(problems), batch):
        rows = [_encode_problem(p) for p in problems[i:i + batch]]
        T = max(len(r) for r, _ in rows)
        tok = torch.full((len(rows), T), _TOK.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for b, (r, nq) in enumerate(rows):
            tok[b, :len(r)] = torch.tensor(r)
            mask[b, nq - 1:len(r) - 1] = True
        tok, mask = tok.to(device), mask.to(device)
        logits = model(tok[:, :-1]).float()
        m = mask[:, :-1]
        tgt = tok[:, 1:][m]
        loss += float(F.cross_entropy(logits[m], tgt, reduction="sum"))
        correct += int((logits[m].argmax(-1) == tgt).sum())
        n += int(m.sum())
    return {"solution_loss": loss / n, "solution_token_accuracy": correct / n}


@torch.no_grad()
def greedy_solve(model, problems, device, batch: int, max_new: int) -> dict:
    """Greedy decoding (temperature 0) from '<bos> question <sep>' (prompts left-padded) to <eos> or
    `max_new` tokens. Scored: the final answer (parse_answer == problem.answer) and whether the whole
    solution passes igsm.check_solution."""
    answers = full = 0
    examples = []
    for i in range(0, len(problems), batch):
        chunk = problems[i:i + batch]
        prompts = [row[:n_q] for row, n_q in map(_encode_problem, chunk)]
        T = max(len(q) for q in prompts)
        ids = torch.full((len(chunk), T), _TOK.pad_id, dtype=torch.long)
        am = torch.zeros(len(chunk), T, dtype=torch.bool)
        for b, q in enumerate(prompts):
            ids[b, T - len(q):] = torch.tensor(q)
            am[b, T - len(q):] = True
        gen = model.generate(ids.to(device), max_new, temperature=0, eos_token_id=_TOK.eos_id,
                             attention_mask=am.to(device))[:, T:].cpu()
        for p, g in zip(chunk, gen.tolist()):
            g = g[:g.index(_TOK.eos_id)] if _TOK.eos_id in g else g
            text = _TOK.decode(t for t in g if t >= len(_TOK.SPECIALS))
            ok = igsm.parse_answer(text) == p.answer
            answers += ok
            try:
                igsm.check_solution(igsm.Problem(p.question_text, text, p.answer, p.n_operations, p.graph))
                full += 1
            except igsm.SolutionError:
                pass
            if len(examples) < 2:
                examples.append({"reference": p.solution_text, "generated": text, "answer_correct": ok})
    return {"answer_accuracy": answers / len(problems), "solution_correct": full / len(problems),
            "examples": examples}


def _trained_model(cfg: ModelConfig, run_dir: Path, device, keep: bool) -> LM:
    """The arm's final weights from its checkpoint (deleted afterwards unless `keep`)."""
    weights, _ = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
    model = LM(cfg, seed=0)
    model.load_state_dict(weights)
    if not keep:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return model.to(device).eval()


PAPER = ("iGSM final-answer accuracy, vanilla → KV shift: 0.8154 → 0.8909 (train ≤ 12 operations, test 15); "
         "0.8711 → 0.9062 (train ≤ 21, test 24).")


def igsm_experiment(opts: RunOptions, out: Path) -> dict:
    """Trains the selected (setting, seed, arm) runs, publishes each into out/runs/ as
    <arm>-<setting>-s<seed>.json (+ .metrics.jsonl), then summarises every run published there: jobs split by
    --only SETTING, --seeds or --arms merge by copying their results into one tree."""
    device = default_device()
    sts = settings(opts.scale, opts.only)
    if opts.arms and set(opts.arms) - set(ARMS):
        raise ValueError(f"--arms: igsm has arms {list(ARMS)}, got {sorted(set(opts.arms) - set(ARMS))}")
    arms = [a for a in ARMS if not opts.arms or a in opts.arms]
    adopt_legacy(out)
    for s in sts:
        tr, te, key = s["train_ops"], s["test_ops"], setting_key(s)
        spec = _spec(s, opts.steps)
        test = igsm_eval_set(te, s["n_test"], True, EVAL_SEED + te)
        ind = igsm_eval_set(tr, s["n_id"], False, EVAL_SEED + 100 + tr)
        max_new = int(1.25 * max(len(_TOK.encode(p.solution_text)) for p in test)) + 2
        max_new_id = int(1.25 * max(len(_TOK.encode(p.solution_text)) for p in ind)) + 2
        train = {**spec.to_dict(), "train_ops": tr, "test_ops": te, "seq": s["seq"], "n_test": s["n_test"],
                 "n_id": s["n_id"]}
        eval_fn = functools.partial(teacher_forced, problems=test, device=device)
        for seed in opts.seed_list():
            stream = DataStream(functools.partial(_sample_igsm, tr, s["seq"]), spec.batch_size, spec.steps,
                                seed=1000 + seed)
            for att in arms:
                cfg = ModelConfig(vocab_size=_TOK.vocab_size, dim=s["dim"], n_layers=s["n_layers"],
                                  n_heads=s["heads"], ffn_dim=s["ffn"], max_seq_len=s["seq"] + max_new,
                                  attention=att, name=f"{att}-{s['n_layers']}L")
                name = f"{att}-{key}"
                run_dir = opts.runs / f"igsm-{opts.scale}" / f"{name}-s{seed}"
                r = train_arm(name, cfg, StreamSource(stream, igsm_batch), spec, seq_len=s["seq"] - 1, seed=seed,
                              evaluator=eval_fn, run_dir=run_dir, device=device, keep_model=True, log=opts.log)
                sm = r["summary"]
                final = sm["final_eval"] or {}
                model = _trained_model(cfg, run_dir, device, keep=opts.keep_checkpoints)
                tg = time.time()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.bf16):
                    gt = greedy_solve(model, test, device, s["gen_batch"], max_new)
                    gi = greedy_solve(model, ind, device, s["gen_batch"], max_new_id)
                    ti = teacher_forced(model, ind, device)
                row = {"setting": key, "attention": att, "order": ARMS.index(att), "train_ops": tr, "test_ops": te,
                       "max_new_tokens": max_new, "model": cfg.to_dict(), "train": train, "final": final,
                       "train_seconds": sm["train_time_s"], "wall_seconds": sm["wall_time_s"],
                       "diverged_at": sm["diverged_step"], "steps_done": sm["steps"],
                       "non_embedding_params": sm["non_embedding_params"],
                       "data_generation_seconds": stream.gen_seconds,
                       "test": {**gt, **{k: final[k] for k in ("solution_loss", "solution_token_accuracy")}},
                       "in_distribution": {**gi, **ti}, "generation_seconds": time.time() - tg,
                       "provenance": provenance(device)}
                toy_runs.publish(out, name, seed, row, [{**x, "train_ops": tr, "eval": "solution_loss" in x} for x in r["records"]])
                opts.log(f"igsm {key} seed {seed} {att}: test answer acc {gt['answer_accuracy']:.3f}, "
                         f"in-dist {gi['answer_accuracy']:.3f}, test token acc {final['solution_token_accuracy']:.3f} "
                         f"({sm['train_time_s']:.0f} s train, {row['generation_seconds']:.0f} s generation)")
    return summarize(opts, out)


def adopt_legacy(out: Path) -> None:
    """A summary.json written before runs were published (its runs inline, their records in metrics.jsonl) is
    published run by run, so its setting survives in the merged summary."""
    if toy_runs.has_runs(out) or not (out / "summary.json").is_file():
        return
    s = read_json(out / "summary.json")
    if "runs" not in s or "seq_len" not in s:
        return
    recs = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    prov = {k: s[k] for k in ("command", "git_commit", "kvshift", "torch", "python", "device", "time_utc") if k in s}
    for r in s["runs"]:
        tr, te, att, seed = r["train_ops"], r["test_ops"], r["arm"], r["seed"]
        train = {**s["train"], "train_ops": tr, "test_ops": te, "seq": s["seq_len"], "n_test": s["n_test"],
                 "n_id": s["n_in_distribution"]}
        key = setting_key({"train_ops": tr, "test_ops": te})
        row = {**{k: v for k, v in r.items() if k not in ("arm", "seed")}, "setting": key,
               "attention": att, "order": ARMS.index(att), "train": train, "provenance": prov}
        toy_runs.publish(out, f"{att}-{key}", seed, row,
                         [x for x in recs if x.get("arm") == f"{att}-Tr{tr}" and x.get("seed") == seed])


def summarize(opts: RunOptions, out: Path) -> dict:
    """The summary from every run published in out/runs/; the runs of one setting must share its training
    setting (a run from another is refused by name)."""
    adopt_legacy(out)
    runs = toy_runs.published(out)
    if not runs:
        raise ValueError(f"{out}: no published igsm runs yet")
    ops = {r["setting"]: r["train_ops"] for r in runs}
    keys = sorted(ops, key=lambda k: (-ops[k], k))  # the larger split first, then by name
    log = ResultsLog(out)  # every run's records, for the plot
    results = {}
    for key in keys:
        rs = [r for r in runs if r["setting"] == key]
        toy_runs.check_same_setting(rs, out)
        gains = {}
        for r in rs:
            recs = read_jsonl(out / toy_runs.RUNS / f"{r['arm']}-s{r['seed']}.metrics.jsonl")
            for x in recs:
                log.log({**x, "arm": r["attention"], "setting": key})
            gains[(r["attention"], str(r["seed"]))] = igsm_report.late_gain(recs)
        results[key] = setting_results(rs, gains)
    log.close()
    prov = toy_runs.merged_provenance(runs)
    summ = {"experiment": "igsm", "scale": opts.scale, "paper": PAPER, **prov, "summarized_by": command_line(),
            "settings": list(results), "seeds": len({r["seed"] for r in runs}),
            "chance_answer_accuracy": 1 / igsm.MOD, "results": results,
            "runs": [{k: v for k, v in r.items() if k != "provenance"} for r in runs],
            "wall_seconds": sum(r["wall_seconds"] + r["generation_seconds"] for r in runs)}
    summ["verdict"], summ["verdict_text"] = igsm_verdict(results, longer_budgets(opts.scale, results))
    write_summary(out, summ)
    igsm_report.plot_igsm(out, summ)
    igsm_report.write_igsm_readme(out, summ)
    return summ


def longer_budgets(scale: str, results: dict) -> dict:
    """Per summarised setting, the shortest longer budget of the same split in the scale's plan that no run
    used yet, as the verdict names it."""
    out = {}
    for key, r in results.items():
        more = [st for st in settings(scale) if (st["train_ops"], st["test_ops"], setting_key(st) in results)
                == (r["train_max_operations"], r["test_operations"], False) and st["steps"] > r["steps"]]
        if more:
            st = min(more, key=lambda st: st["steps"])
            out[key] = (f"{setting_key(st)} ({st['steps']} steps × batch {st['batch']}, "
                        f"{st['steps'] * st['batch']:,} training rows)")
    return out


def setting_results(rs: list[dict], gains: dict | None = None) -> dict:
    """One setting's runs: the training setting, and per arm the seed means and per-seed values. gains: per
    (arm, seed), the held-out token accuracy gained over the run's last third (`igsm_report.late_gain`)."""
    t = rs[0]["train"]
    res = {"train_max_operations": t["train_ops"], "test_operations": t["test_ops"], "steps": t["steps"],
           "batch_size": t["batch_size"], "seq_len": t["seq"], "n_test": t["n_test"], "n_in_distribution": t["n_id"],
           "arms": {}}
    for att in ARMS:
        rows = [r for r in rs if r["attention"] == att]
        if not rows:
            continue
        a = {}
        for part in ("test", "in_distribution"):
            for k in ("answer_accuracy", "solution_correct", "solution_token_accuracy"):
                v = {str(r["seed"]): r[part][k] for r in rows}
                a[f"{part}_{k}"], a[f"{part}_{k}_per_seed"] = sum(v.values()) / len(v), v
        a["test_solution_loss"] = sum(r["test"]["solution_loss"] for r in rows) / len(rows)
        late = {str(r["seed"]): (gains or {}).get((att, str(r["seed"]))) for r in rows}
        a["test_solution_token_accuracy_late_gain_per_seed"] = {x: g for x, g in late.items() if g is not None}
        a["non_embedding_params"] = rows[0]["non_embedding_params"]
        res["arms"][att] = a
    return res


EXPERIMENTS = [
    Experiment(
        "igsm", "App. I", "iGSM accuracy: 0.8154 → 0.8909 (train ≤ 12 ops, test 15); 0.8711 → 0.9062 (≤ 21 → 24).",
        f"a setting decides only when every run of both arms reaches {ID_LEARNED:.0%} in-distribution answer "
        f"accuracy over ≥ {MIN_SEEDS} seeds; there KV shift wins when its mean test answer accuracy beats vanilla's "
        "by more than two standard errors (the larger of the binomial and the seed-to-seed one), above chance. "
        "reproduced: every deciding setting won and one is the paper's; partly: some won, or only a smaller split "
        "(Tr6-Te8) did; not reproduced: none won; inconclusive: no setting decides.",
        "App. I: iGSM math, train on <= N operations, test on more; vanilla vs KV shift", igsm_experiment,
        summarize=summarize, options=("only", "arms", "runs")),
]
