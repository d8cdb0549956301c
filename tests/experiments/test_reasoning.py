"""hop-k and iGSM experiments end to end at a tiny scale, plus the pieces their scores rest on."""

import json
import random

import pytest
import torch

from kvshift.experiments import hopk as hopk_exp
from kvshift.experiments import igsm as igsm_exp
from kvshift.experiments.base import VERDICTS, RunOptions
from kvshift.experiments.cli import run_experiment
from kvshift.models import LM, ModelConfig
from kvshift.tasks import hopk, igsm

FILES = ("metrics.jsonl", "summary.json", "plot.png", "README.md")


def _check_common(out, summ, name):
    for f in FILES:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["experiment"] == name and on_disk["scale"] == "cpu"
    for k in ("paper", "verdict", "verdict_text", "command", "git_commit", "device", "torch"):
        assert k in on_disk, k
    assert on_disk["verdict"] in VERDICTS
    assert summ["verdict"] == on_disk["verdict"]


@pytest.fixture
def tiny_hopk(monkeypatch):
    s = dict(hopk_exp.HOPK["iid"]["cpu"], depths=(1, 2), seq=24, dim=16, heads=2, ffn=32, batch=8, steps=6, warmup=2,
             eval_every=4, n_eval=4)
    monkeypatch.setitem(hopk_exp.HOPK["iid"], "cpu", s)
    return s


def test_hopk_end_to_end(tmp_path, tiny_hopk):
    summ = run_experiment("hopk", RunOptions(out=tmp_path, runs=tmp_path / "runs", log=lambda m: None))
    _check_common(tmp_path, summ, "hopk")
    assert summ["depths"] == [1, 2]
    assert len(summ["defined_fraction_by_k"]) == 17
    for L in ("1", "2"):
        for arm in ("vanilla", "kvshift"):
            e = summ["error_by_depth"][L][arm]
            assert len(e["error_by_k"]) == 17 and len(e["error_by_k_defined"]) == 17
            assert all(0 <= v <= 1 for v in e["error_by_k"] + e["error_by_k_defined"])
            assert 0 <= e["mean_error_k_ge_8"] <= 1 and -1 <= e["hops_solved"] <= 16
    assert len(summ["runs"]) == 4 and all(r["diverged_at"] is None for r in summ["runs"])
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("eval") and r["step"] == 4 for r in recs)  # the mid-training eval
    assert {r["arm"] for r in recs} == {"vanilla-1L", "kvshift-1L", "vanilla-2L", "kvshift-2L"}


def test_hopk_jobs_split_by_depth_and_seed_merge(tmp_path, tiny_hopk, monkeypatch):
    """Runs published by separate jobs (--only DEPTH, --seeds) are summarised together; the paper's variant
    (no adjacent repeats, GPT-2-style blocks) runs through the same code."""
    monkeypatch.setitem(hopk_exp.HOPK["norepeat"], "cpu", dict(hopk_exp.HOPK["norepeat"]["cpu"], **{
        k: v for k, v in tiny_hopk.items() if k not in ("model", "no_adjacent_repeats")}))
    opts = lambda **kw: RunOptions(out=tmp_path, runs=tmp_path / "runs", log=lambda m: None, **kw)  # noqa: E731
    run_experiment("hopk-norepeat", opts(only=["1"], seeds=[0]))
    run_experiment("hopk-norepeat", opts(only=["2"], seeds=[1], arms=["kvshift"]))
    s = run_experiment("hopk-norepeat", opts(only=["2"], seeds=[1], arms=["vanilla"]))
    assert s["depths"] == [1, 2] and s["seeds"] == 2 and len(s["runs"]) == 4
    assert s["error_by_depth"]["2"]["kvshift"]["hops_solved_per_seed"].keys() == {"1"}
    assert s["task"]["no_adjacent_repeats"] and s["model"] == {"position": "learned", "mlp": "gelu"}
    assert all(r["model"]["position"] == "learned" and r["model"]["mlp"] == "gelu" for r in s["runs"])
    assert s == run_experiment("hopk-norepeat", opts(summarize_only=True)) | {"summarized_by": s["summarized_by"],
                                                                             "time_utc": s["time_utc"]}
    with pytest.raises(ValueError, match="--only"):
        run_experiment("hopk-norepeat", opts(only=["7"]))


def test_hopk_arms_share_init_and_data(tiny_hopk):
    s = tiny_hopk
    cfg = lambda att: ModelConfig(vocab_size=22, dim=16, n_layers=2, n_heads=2, ffn_dim=32, max_seq_len=24,
                                  attention=att)
    a, b = LM(cfg("vanilla"), seed=3).state_dict(), LM(cfg("kvshift"), seed=3).state_dict()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
    x1 = hopk_exp._sample_hopk(s["seq"], 4, 16, 3, torch.Generator().manual_seed(5))
    x2 = hopk_exp._sample_hopk(s["seq"], 4, 16, 3, torch.Generator().manual_seed(5))
    assert all(torch.equal(p, q) for p, q in zip(x1, x2))


def test_hopk_verdict_rules():
    row = lambda ge8, le4: {"mean_error_k_ge_8": ge8, "mean_error_k_le_4": le4, "hops_solved": 1}
    mk = lambda kv, va: {"5": {"kvshift": row(kv, 0.0), "vanilla": row(va, 0.0)}}
    assert hopk_v(mk(0.05, 0.4), 5) == "reproduced"
    assert hopk_v({"3": mk(0.05, 0.4)["5"]}, 3) == "partly reproduced"  # right direction, shallower than L = 5
    assert hopk_v(mk(0.3, 0.31), 5) == "not reproduced"
    # no advantage where the run cannot test the claim: shallower than L = 5, or the easier i.i.d. task
    assert hopk_v({"3": mk(0.3, 0.31)["5"]}, 3) == "inconclusive"
    assert hopk_exp.hopk_verdict(mk(0.01, 0.01), 5, "iid")[0] == "inconclusive"


def test_hops_solved():
    assert hopk_exp.hops_solved([0.0, 0.01, 0.3, 0.0]) == 1  # stops at the first miss
    assert hopk_exp.hops_solved([0.2, 0.0]) == -1
    assert hopk_exp.hops_solved([0.0] * 17) == 16


def hopk_v(d, L):
    return hopk_exp.hopk_verdict(d, L)[0]


TINY_IGSM = dict(seq=160, steps=4, batch=4)


@pytest.fixture
def tiny_igsm(monkeypatch):
    s = dict(igsm_exp.IGSM["cpu"], settings=(dict(train_ops=2, test_ops=3, **TINY_IGSM),
                                             dict(train_ops=1, test_ops=2, **TINY_IGSM)),
             dim=16, heads=2, n_layers=1, ffn=32, warmup=2, eval_every=2, n_test=4, n_id=3, gen_batch=3)
    monkeypatch.setitem(igsm_exp.IGSM, "cpu", s)
    return s


def _igsm_opts(tmp_path, **kw):
    return RunOptions(out=tmp_path / "out", runs=tmp_path / "runs", log=lambda m: None, **kw)


def test_igsm_end_to_end(tmp_path, tiny_igsm):
    summ = run_experiment("igsm", _igsm_opts(tmp_path, only=["Tr2-Te3"]))
    _check_common(tmp_path / "out", summ, "igsm")
    assert summ["settings"] == ["Tr2-Te3"]
    r = summ["results"]["Tr2-Te3"]
    assert (r["test_operations"], r["steps"], r["batch_size"], r["seq_len"]) == (3, 4, 4, 160)
    for arm in ("vanilla", "kvshift"):
        for k, v in r["arms"][arm].items():
            if k.endswith("accuracy") or k.endswith("correct"):
                assert 0 <= v <= 1, k
        assert r["arms"][arm]["test_answer_accuracy_per_seed"].keys() == {"0"}
    assert len(summ["runs"]) == 2
    assert sorted(p.name for p in (tmp_path / "out" / "runs").glob("*.json")) == [
        "kvshift-Tr2-Te3-s0.json", "vanilla-Tr2-Te3-s0.json"]
    recs = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert any("solution_token_accuracy" in x and x["step"] == 2 and x["arm"] == "kvshift" for x in recs)
    assert all(x["eval"] == ("solution_token_accuracy" in x) for x in recs)  # the evaluations are marked


def test_igsm_split_jobs_merge_and_resummarize(tmp_path, tiny_igsm):
    """Runs published by separate jobs (--seeds, --arms, --only SETTING) make one summary; --summarize
    rebuilds the same; an unknown setting or arm is refused."""
    run_experiment("igsm", _igsm_opts(tmp_path, only=["Tr2-Te3"], seeds=[0]))
    run_experiment("igsm", _igsm_opts(tmp_path, only=["Tr2-Te3"], seeds=[1], arms=["kvshift"]))
    run_experiment("igsm", _igsm_opts(tmp_path, only=["Tr1-Te2"], seeds=[0], arms=["vanilla"]))
    s = run_experiment("igsm", _igsm_opts(tmp_path, only=["Tr2-Te3"], seeds=[1], arms=["vanilla"]))
    assert s["settings"] == ["Tr2-Te3", "Tr1-Te2"] and s["seeds"] == 2 and len(s["runs"]) == 5
    r = s["results"]["Tr2-Te3"]["arms"]
    assert r["kvshift"]["test_answer_accuracy_per_seed"].keys() == r["vanilla"]["in_distribution_answer_accuracy_per_seed"].keys() == {"0", "1"}
    assert list(s["results"]["Tr1-Te2"]["arms"]) == ["vanilla"]
    assert "Tr1-Te2: only vanilla ran" in s["verdict_text"]
    again = run_experiment("igsm", _igsm_opts(tmp_path, summarize_only=True))
    assert again == s | {"summarized_by": again["summarized_by"], "time_utc": again["time_utc"]}
    with pytest.raises(ValueError, match="--only"):
        run_experiment("igsm", _igsm_opts(tmp_path, only=["Tr9-Te9"]))
    with pytest.raises(ValueError, match="--arms"):
        run_experiment("igsm", _igsm_opts(tmp_path, arms=["kshift"]))


def test_igsm_refuses_a_run_from_another_setting(tmp_path, tiny_igsm):
    run_experiment("igsm", _igsm_opts(tmp_path, only=["Tr2-Te3"], seeds=[0], arms=["kvshift"]))
    with pytest.raises(ValueError, match="kvshift-Tr2-Te3-s1 was trained with"):
        run_experiment("igsm", _igsm_opts(tmp_path, only=["Tr2-Te3"], seeds=[1], arms=["kvshift"], steps=3))
    with pytest.raises(ValueError, match="kvshift-Tr2-Te3-s1 was trained with"):
        run_experiment("igsm", _igsm_opts(tmp_path, summarize_only=True))


def test_igsm_named_setting_keeps_its_runs_apart(tmp_path, monkeypatch):
    """Two settings of one split, one named: their runs are published and summarised under their own names."""
    s = dict(igsm_exp.IGSM["cpu"], settings=(dict(train_ops=1, test_ops=2, **TINY_IGSM),
                                             dict(name="Tr1-Te2-long", train_ops=1, test_ops=2,
                                                  **{**TINY_IGSM, "steps": 6})),
             dim=16, heads=2, n_layers=1, ffn=32, warmup=2, eval_every=2, n_test=4, n_id=3, gen_batch=3)
    monkeypatch.setitem(igsm_exp.IGSM, "cpu", s)
    run_experiment("igsm", _igsm_opts(tmp_path, arms=["vanilla"]))
    summ = run_experiment("igsm", _igsm_opts(tmp_path, summarize_only=True))
    assert summ["settings"] == ["Tr1-Te2", "Tr1-Te2-long"]
    assert [summ["results"][k]["steps"] for k in summ["settings"]] == [4, 6]
    assert sorted(p.name for p in (tmp_path / "out" / "runs").glob("*.json")) == [
        "vanilla-Tr1-Te2-long-s0.json", "vanilla-Tr1-Te2-s0.json"]


def test_igsm_gpu_settings():
    """The gpu scale holds the paper's split and the smaller one; Tr6 rows fit the row length (measured max 436)."""
    keys = [igsm_exp.setting_key(st) for st in igsm_exp.settings("gpu")]
    assert keys == ["Tr12-Te15", "Tr6-Te8", "Tr6-Te8-long"]
    (st,) = igsm_exp.settings("gpu", ["Tr6-Te8"])
    assert (st["seq"], st["steps"], st["batch"], st["dim"]) == (448, 6000, 128, 384)
    (long,) = igsm_exp.settings("gpu", ["Tr6-Te8-long"])  # the same split and model, three times the steps
    assert {k: v for k, v in long.items() if k not in ("name", "steps", "eval_every")} == \
        {k: v for k, v in st.items() if k not in ("steps", "eval_every")} and long["steps"] == 3 * st["steps"]
    rng = random.Random(3)
    lens = [len(igsm_exp._encode_problem(igsm.generate(6, rng=rng))[0]) for _ in range(2000)]
    assert max(lens) <= st["seq"]


def _igsm_results(key, kv_test, va_test, kv_id=(0.9, 0.9), va_id=(0.9, 0.9), n=512, steps=3000):
    arm = lambda test, ind: {  # noqa: E731
        "test_answer_accuracy": sum(test) / len(test), "in_distribution_answer_accuracy": sum(ind) / len(ind),
        "test_answer_accuracy_per_seed": {str(i): v for i, v in enumerate(test)},
        "in_distribution_answer_accuracy_per_seed": {str(i): v for i, v in enumerate(ind)}}
    return {key: {"train_max_operations": 6, "test_operations": 8, "steps": steps, "batch_size": 64, "n_test": n,
                  "n_in_distribution": n, "arms": {"vanilla": arm(va_test, va_id), "kvshift": arm(kv_test, kv_id)}}}


def test_igsm_verdict_rules():
    v = lambda *a, **k: igsm_exp.igsm_verdict(_igsm_results(*a, **k))  # noqa: E731
    # an arm below 0.8 in distribution in any seed: inconclusive, whatever the test accuracies
    verdict, text = v("Tr12-Te15", (0.9, 0.9), (0.1, 0.1), kv_id=(0.95, 0.95), va_id=(0.85, 0.79))
    assert verdict == "inconclusive"
    assert "3000 steps × batch 64" in text and "s1 0.790" in text and "s0 0.850" in text
    assert v("Tr12-Te15", (0.9, 0.9), (0.5, 0.5))[0] == "reproduced"
    verdict, text = v("Tr6-Te8", (0.9, 0.9), (0.5, 0.5))
    assert verdict == "partly reproduced" and "a smaller split than the paper's" in text  # at most partly from Tr6
    assert v("Tr12-Te15", (0.9,), (0.5,), kv_id=(0.9,), va_id=(0.9,))[0] == "inconclusive"  # one seed
    assert v("Tr6-Te8", (0.52, 0.5), (0.5, 0.5))[0] == "not reproduced"  # within two standard errors
    assert v("Tr6-Te8", (0.5, 0.5), (0.9, 0.9))[0] == "not reproduced"
    both = {**_igsm_results("Tr12-Te15", (0.9, 0.9), (0.5, 0.5)), **_igsm_results("Tr6-Te8", (0.5, 0.5), (0.5, 0.5))}
    assert igsm_exp.igsm_verdict(both)[0] == "partly reproduced"


def test_igsm_states_an_unequal_in_distribution_accuracy_when_the_ood_test_cannot_decide():
    """Below the in-distribution bar the verdict stays inconclusive, but a clear in-distribution gap at the same
    budget (learning speed) is stated with its SE; a gap within two SEs is not."""
    verdict, text = igsm_exp.igsm_verdict(_igsm_results("Tr6-Te8", (0.08, 0.09), (0.07, 0.06), kv_id=(0.77, 0.75),
                                                        va_id=(0.43, 0.45), n=256))
    assert verdict == "inconclusive"
    assert "in-distribution KV shift − vanilla +0.320 ± 0.029 (256 problems, 2 seed(s)), a difference in" in text
    text = igsm_exp.igsm_verdict(_igsm_results("Tr6-Te8", (0.08,), (0.07,), kv_id=(0.77,), va_id=(0.43,), n=256))[1]
    assert "(256 problems, 1 seed(s); the SE is the test sample's only" in text and "learning speed" not in text
    text = igsm_exp.igsm_verdict(_igsm_results("Tr6-Te8", (0.08,), (0.07,), kv_id=(0.45,), va_id=(0.43,), n=256))[1]
    assert "learned the training distribution unequally" not in text
    assert "In distribution KV shift − vanilla +0.020 ± 0.044 (1 seed(s)): within two SE" in text
    # two seeds that disagree: the seed-to-seed spread sets the in-distribution SE (|0.332 - 0.059| / 2)
    text = igsm_exp.igsm_verdict(_igsm_results("Tr6-Te8", (0.08, 0.07), (0.07, 0.06), kv_id=(0.766, 0.727),
                                               va_id=(0.434, 0.668), n=256))[1]
    assert "unequally" not in text and "+0.195 ± 0.137 (2 seed(s)): within two SE" in text


def test_igsm_late_gain_and_what_the_verdict_says_of_the_budget():
    """Below the bar the row says whether the runs were still learning (held-out token accuracy over their last
    third) and names the longer budget of the same split that the plan holds and no run used."""
    ev = lambda *pairs: [{"step": s, "solution_token_accuracy": a} for s, a in pairs]  # noqa: E731
    curve = ev((0, 0.0), (1000, 0.80), (2000, 0.81), (3000, 0.83), (4000, 0.85), (5000, 0.86), (6000, 0.874))
    assert igsm_exp.igsm_report.late_gain(curve + [{"step": 6000, "loss": 0.3}]) == pytest.approx(0.874 - 0.85)
    assert igsm_exp.igsm_report.late_gain(ev((0, 0.1), (300, 0.5), (600, 0.7))) is None  # only the last is late
    assert igsm_exp.igsm_report.late_gain(ev((0, 0.1), (400, 0.5), (600, 0.7))) == pytest.approx(0.2)
    assert igsm_exp.igsm_report.late_gain(ev((600, 0.7))) is None and igsm_exp.igsm_report.late_gain([]) is None
    res = _igsm_results("Tr6-Te8", (0.08, 0.07), (0.07, 0.06), kv_id=(0.77, 0.73), va_id=(0.43, 0.67), steps=6000)
    for a, g in (("vanilla", {"0": 0.026, "1": 0.036}), ("kvshift", {"0": 0.025, "1": 0.013})):
        res["Tr6-Te8"]["arms"][a]["test_solution_token_accuracy_late_gain_per_seed"] = g
    longer = igsm_exp.longer_budgets("gpu", res)
    assert longer == {"Tr6-Te8": "Tr6-Te8-long (18000 steps × batch 128, 2,304,000 training rows)"}
    verdict, text = igsm_exp.igsm_verdict(res, longer)
    assert verdict == "inconclusive"
    assert ("still rose over the last third of training in 4 of 4 runs (+0.013 to +0.036): no run had converged, "
            "so a longer budget may reach the bar; the next budget in this scale's plan, Tr6-Te8-long") in text
    for a in ("vanilla", "kvshift"):
        res["Tr6-Te8"]["arms"][a]["test_solution_token_accuracy_late_gain_per_seed"] = {"0": 0.001, "1": -0.002}
    text = igsm_exp.igsm_verdict(res)[1]
    assert "in 0 of 4 runs" in text and "levelled off" in text and "not known from these runs" in text
    # once the longer setting has runs, or for a split the plan holds no longer budget of, none is named
    assert igsm_exp.longer_budgets("gpu", {**res, **_igsm_results("Tr6-Te8-long", (0.1,), (0.1,))}) == {}
    tr12 = _igsm_results("Tr12-Te15", (0.1,), (0.1,))
    tr12["Tr12-Te15"].update(train_max_operations=12, test_operations=15)
    assert igsm_exp.longer_budgets("gpu", tr12) == {}


def test_igsm_ood_difference_se():
    d = igsm_exp.ood_difference(_igsm_results("Tr6-Te8", (0.9, 0.8), (0.7, 0.6), n=100)["Tr6-Te8"])
    assert d["seeds"] == ["0", "1"] and d["per_seed"] == pytest.approx({"0": 0.2, "1": 0.2})
    assert d["mean"] == pytest.approx(0.2) and d["se"] == pytest.approx((0.007 ** 0.5) / 2)
    text = igsm_exp.igsm_verdict(_igsm_results("Tr6-Te8", (0.9, 0.8), (0.7, 0.6), n=100))[1]
    assert "+0.200 ± 0.042" in text and "kvshift s0 0.900, s1 0.800" in text
    # a difference that changes sign from seed to seed: the seed-to-seed spread sets the SE, not the binomial one
    d = igsm_exp.ood_difference(_igsm_results("Tr6-Te8", (0.99, 0.5), (0.5, 0.99), n=100000)["Tr6-Te8"])
    assert d["se"] == pytest.approx(0.49 * 2 ** 0.5 / 2 ** 0.5, rel=1e-6)
    assert igsm_exp.igsm_verdict(_igsm_results("Tr6-Te8", (0.99, 0.6), (0.5, 0.5), n=100000))[0] == "not reproduced"


def test_igsm_sampler_rows_and_mask():
    tok, mask = igsm_exp._sample_igsm(3, 200, 5, torch.Generator().manual_seed(0))
    assert tok.shape == mask.shape == (5, 200) and tok.dtype == torch.int16
    assert igsm_exp.igsm_batch(tok, mask)["input_ids"].dtype == torch.int64
    T = igsm.IGSMTokenizer()
    for b in range(5):
        row = tok[b][tok[b] != T.pad_id].tolist()
        sep = row.index(T.sep_id)
        # the mask marks exactly the positions whose next token is a solution token or <eos>
        assert mask[b].nonzero().flatten().tolist() == list(range(sep, len(row) - 1))
        assert row[-1] == T.eos_id and row[0] == T.bos_id


def test_greedy_scoring_of_a_perfect_and_a_wrong_solver(monkeypatch):
    """greedy_solve scores what generate() returns: feed it the reference solution (all right) and a
    solution with the answer changed (answer wrong, not fully correct)."""
    rng = random.Random(0)
    problems = [igsm.generate(2, rng=rng, exact=True) for _ in range(3)]
    T = igsm.IGSMTokenizer()

    class Oracle:
        def __init__(self, corrupt):
            self.corrupt = corrupt

        def generate(self, ids, max_new, **kw):
            rows = []
            for b, p in enumerate(problems[:ids.shape[0]]):
                sol = p.solution_text
                if self.corrupt:
                    sol = sol.rsplit(" ", 2)[0] + f" {(p.answer + 1) % igsm.MOD} ."
                rows.append(T.encode(sol) + [T.eos_id])
            L = max(map(len, rows))
            gen = torch.tensor([r + [T.eos_id] * (L - len(r)) for r in rows])
            return torch.cat([ids.cpu(), gen], 1)

    good = igsm_exp.greedy_solve(Oracle(False), problems, torch.device("cpu"), batch=3, max_new=500)
    bad = igsm_exp.greedy_solve(Oracle(True), problems, torch.device("cpu"), batch=3, max_new=500)
    assert good["answer_accuracy"] == 1 and good["solution_correct"] == 1
    assert bad["answer_accuracy"] == 0 and bad["solution_correct"] == 0


@pytest.mark.parametrize("attention", ["vanilla", "kvshift"])
def test_left_padded_greedy_matches_one_by_one(attention):
    """The batched, left-padded generation the iGSM score uses equals generating each prompt alone."""
    cfg = ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=64, attention=attention)
    model = LM(cfg, seed=1).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 40, (n,), generator=g) for n in (5, 9, 7)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(3, T, dtype=torch.long)
    am = torch.zeros(3, T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = p
        am[b, T - len(p):] = True
    batched = model.generate(ids, 6, temperature=0, attention_mask=am)[:, T:]
    for b, p in enumerate(prompts):
        alone = model.generate(p.view(1, -1), 6, temperature=0)[0, len(p):]
        assert torch.equal(batched[b], alone), b


def test_task_batches_give_the_tasks_losses():
    """The trainer's cross-entropy (ignore -100) on the tasks' batches is each task's own loss: iGSM's on the
    solution tokens only, hop-k's read at each position."""
    torch.manual_seed(0)
    tok, mask = igsm_exp._sample_igsm(3, 200, 4, torch.Generator().manual_seed(0))
    b = igsm_exp.igsm_batch(tok, mask)
    V = igsm.IGSMTokenizer().vocab_size
    logits = torch.randn(*b["input_ids"].shape, V)
    ours = torch.nn.functional.cross_entropy(logits.view(-1, V), b["labels"].view(-1), ignore_index=-100)
    T = b["input_ids"].shape[1] + 1
    m = mask[:, :T - 1]
    ref = torch.nn.functional.cross_entropy(logits[m], tok[:, 1:T][m].long())
    assert torch.allclose(ours, ref) and T <= 200 and (tok[:, T:] == igsm.IGSMTokenizer().pad_id).all()
    t, y = hopk_exp._sample_hopk(24, 4, 16, 2, torch.Generator().manual_seed(1))
    hb = hopk_exp.hopk_batch(t, y)
    assert torch.equal(hb["input_ids"], t) and torch.equal(hb["labels"], y) and hopk.IGNORE_INDEX == -100


def test_igsm_adopts_a_summary_written_before_runs_were_published(tmp_path):
    """An old summary.json (runs inline, records in metrics.jsonl) becomes published runs, and its setting stays
    in the summary beside new ones; an old run left from a different training setting is still refused."""
    part = {"answer_accuracy": 0.1, "solution_correct": 0.0, "solution_token_accuracy": 0.8, "solution_loss": 0.6,
            "examples": []}
    run = lambda att, acc: {"seed": 0, "arm": att, "train_ops": 12, "test_ops": 15, "model": {  # noqa: E731
        "n_layers": 6, "dim": 384, "n_heads": 6, "ffn_dim": 1024, "vocab_size": 170}, "final": {},
        "train_seconds": 1.0, "wall_seconds": 1.0, "diverged_at": None, "non_embedding_params": 5,
        "data_generation_seconds": 1.0, "test": {**part, "answer_accuracy": acc}, "in_distribution": part,
        "generation_seconds": 1.0}
    train = {"steps": 3000, "batch_size": 64, "lr": 1e-3, "warmup": 200}
    old = {"experiment": "igsm", "train": train, "seq_len": 768, "n_test": 512, "n_in_distribution": 256,
           "command": "kvshift experiment igsm --scale gpu", "git_commit": "3ee52fd", "device": "NVIDIA H200",
           "torch": "2.11", "runs": [run("vanilla", 0.05), run("kvshift", 0.07)], "results": {}}
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps(old))
    (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in (
        {"step": 10, "loss": 2.0, "arm": "vanilla-Tr12", "seed": 0}, {"step": 10, "loss": 1.9, "arm": "kvshift-Tr12",
                                                                      "seed": 0})))
    s = run_experiment("igsm", RunOptions(scale="gpu", out=out, summarize_only=True, log=lambda m: None))
    assert sorted(p.name for p in (out / "runs").glob("*.json")) == ["kvshift-Tr12-Te15-s0.json",
                                                                      "vanilla-Tr12-Te15-s0.json"]
    r = s["results"]["Tr12-Te15"]
    assert (r["steps"], r["batch_size"], r["seq_len"]) == (3000, 64, 768)
    assert r["arms"]["kvshift"]["test_answer_accuracy_per_seed"] == {"0": 0.07}
    assert s["verdict"] == "inconclusive" and "vanilla s0 0.100" in s["verdict_text"]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {(x["arm"], x["setting"], x["loss"]) for x in recs} == {("vanilla", "Tr12-Te15", 2.0),
                                                                  ("kvshift", "Tr12-Te15", 1.9)}
    # adopted once: the published runs are the record from now on
    assert run_experiment("igsm", RunOptions(scale="gpu", out=out, summarize_only=True, log=lambda m: None))["runs"] == s["runs"]
    doctored = json.loads((out / "runs" / "kvshift-Tr12-Te15-s0.json").read_text())
    (out / "runs" / "kvshift-Tr12-Te15-s1.json").write_text(json.dumps({**doctored, "seed": 1, "train": {
        **doctored["train"], "steps": 100}}))
    (out / "runs" / "kvshift-Tr12-Te15-s1.metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="kvshift-Tr12-Te15-s1 was trained with"):
        run_experiment("igsm", RunOptions(scale="gpu", out=out, summarize_only=True, log=lambda m: None))


def test_hopk_the_same_command_again_trains_only_what_is_not_published(tmp_path, tiny_hopk, monkeypatch):
    """A run published with the same model and training settings is not trained again (a cut multi-seed command
    continues where it stopped, even without its scratch checkpoints); other settings train again."""
    opts = lambda **kw: RunOptions(out=tmp_path, runs=tmp_path / "runs", log=lambda m: None, **kw)  # noqa: E731
    first = run_experiment("hopk", opts(seeds=[0]))
    trained = []
    real = hopk_exp.train_arm
    monkeypatch.setattr(hopk_exp, "train_arm", lambda name, *a, **k: trained.append((name, k["seed"])) or real(name, *a, **k))
    again = run_experiment("hopk", opts(seeds=[0, 1]))
    assert sorted(trained) == [(f"{a}-{L}L", 1) for a in ("kvshift", "vanilla") for L in (1, 2)]
    assert [r for r in again["runs"] if r["seed"] == 0] == first["runs"]  # seed 0's published runs stand
    trained.clear()
    run_experiment("hopk", opts(seeds=[0], steps=4))  # other settings: trained again
    assert len(trained) == 4
