"""lm-downstream on two tiny exported models: lm-eval offline (small limit), analysis, table and verdict."""

import json
import shutil

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from kvshift.experiments import downstream  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from kvshift.hf.testing import export_tiny

    root = tmp_path_factory.mktemp("pair")
    out = {arm: root / f"m-{arm}" for arm in ("vanilla", "kvshift")}
    for arm, d in out.items():
        export_tiny(d, attention=arm)
    return out


def test_downstream_end_to_end(pair, tmp_path):
    s = downstream.run(pair, tasks=["piqa", "winogrande"], limit=6, name="tiny", eval_dir=tmp_path / "eval",
                       out=tmp_path / "out", device="cpu", batch_size=4)
    assert s["verdict"] in {"reproduced", "partly reproduced", "not reproduced", "inconclusive"}
    for t in ("piqa", "winogrande"):
        r = s["tasks"][t]
        assert r["chance"] == 0.5 and r["vanilla"]["n"] == 6 and 0 <= r["kvshift"]["acc"] <= 1
        assert r["kvshift"]["diff"] == pytest.approx(r["kvshift"]["acc"] - r["vanilla"]["acc"])
        assert r["kvshift"]["significant"] == (abs(r["kvshift"]["diff"]) > 2 * r["kvshift"]["diff_se"])
    for arm in pair:
        assert len(list((tmp_path / "eval").glob(f"m-{arm}-*.json"))) == 1
        assert (tmp_path / "out" / "analysis" / f"tiny-{arm}" / "analysis.json").is_file()
        assert s["heads"][arm]["n_layers"] == 2 and len(s["exports"][arm]["weights_sha256"]) == 64
    assert (tmp_path / "out" / "plot.png").stat().st_size > 5000
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "| piqa (acc) | 6 | 0.5 |" in readme and s["verdict"] in readme
    # a second run reuses both the evaluations and the analyses (same tasks and limit)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "eval").iterdir()}
    downstream.run(pair, tasks=["piqa", "winogrande"], limit=6, name="tiny", eval_dir=tmp_path / "eval",
                   out=tmp_path / "out")
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "eval").iterdir()}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["limit"] == 6
    # another model in a directory of the same name is evaluated on its own, not given the first one's scores
    other = tmp_path / "elsewhere" / pair["kvshift"].name
    shutil.copytree(pair["vanilla"], other)
    assert downstream.evaluation(other, ["piqa"], 6, tmp_path / "eval", device="cpu", batch_size=4)["model"] == str(other)
    assert len(list((tmp_path / "eval").glob(f"{other.name}-*.json"))) == 2


def test_head_and_verdict_rules():
    rep = {"scores": {"prefix_matching": [[0.1, 0.9], [0.6, 0.2]], "previous_token": [[0.7, 0.0], [0.0, 0.0]]}}
    assert downstream.heads(rep, "prefix_matching") == [[0, 1], [1, 0]]
    assert downstream.heads(rep, "previous_token") == [[0, 0]]
    row = lambda d, sig: {"chance": 0.25, "vanilla": {"acc": 0.3}, "kvshift": {"acc": 0.3 + d, "diff": d,  # noqa: E731
                                                                              "significant": sig}}
    assert downstream.verdict({"a": row(0.05, True), "b": row(0.01, False)}, "kvshift")[0] == "reproduced"
    assert downstream.verdict({"a": row(0.05, True), "b": row(0.0, False), "c": row(0.0, False)},
                              "kvshift")[0] == "partly reproduced"
    v, text = downstream.verdict({"a": row(0.05, True), "b": row(-0.05, True)}, "kvshift")
    assert v == "not reproduced" and "worse on b" in text
    # tasks near chance do not count: better on 1 of 2 testable tasks reproduces, on the only one it is partly
    near = {"chance": 0.25, "vanilla": {"acc": 0.26}, "kvshift": {"acc": 0.27, "diff": 0.01, "significant": False}}
    assert downstream.verdict({"a": row(0.05, True), "b": row(0.0, False), "n1": near, "n2": near},
                              "kvshift")[0] == "reproduced"
    assert downstream.verdict({"a": row(0.05, True), "n1": near, "n2": near}, "kvshift")[0] == "partly reproduced"
    # no task separates the arms: the run has no power against a small gain
    flat = {t: dict(row(0.004, False), kvshift={"acc": 0.304, "diff": 0.004, "significant": False, "diff_se": 0.01})
            for t in "ab"}
    v, text = downstream.verdict(flat, "kvshift")
    assert v == "inconclusive" and "smallest detectable difference: a 0.020, b 0.020" in text
    v, text = downstream.verdict({"n1": near, "n2": near}, "kvshift")
    assert v == "inconclusive" and "every task is near chance" in text


def test_bad_model_arguments(tmp_path):
    with pytest.raises(ValueError, match="ARM=DIR"):
        downstream._arms(["vanilla"])
    with pytest.raises(FileNotFoundError, match="--input vanilla: .*no config"):
        downstream._arms([f"vanilla={tmp_path}", f"kvshift={tmp_path}"])


def test_task_rows_standard_errors_and_significance():
    def ev(acc, n=100, norm=None):
        res = {"acc": acc, **({"acc_norm": norm} if norm is not None else {})}
        return {"results": {"piqa": res, "hellaswag": res}, "n_samples": {"piqa": {"effective": n}, "hellaswag": {"effective": n}}}

    rows = downstream.task_rows({"vanilla": ev(0.5, norm=0.30), "kvshift": ev(0.6, norm=0.45)}, ["piqa", "hellaswag"])
    p = rows["piqa"]
    assert p["vanilla"]["se"] == pytest.approx(0.05) and p["kvshift"]["se"] == pytest.approx((0.24 / 100) ** 0.5)
    assert p["kvshift"]["diff"] == pytest.approx(0.1) and p["kvshift"]["diff_se"] == pytest.approx((0.0025 + 0.0024) ** 0.5)
    assert not p["kvshift"]["significant"]  # 0.1 is 1.43 standard errors: not enough
    h = rows["hellaswag"]  # scored by acc_norm
    assert h["metric"] == "acc_norm" and h["kvshift"]["diff"] == pytest.approx(0.15) and h["kvshift"]["significant"]
    assert not p["kvshift"]["paired"]


def test_task_rows_pair_the_documents_when_both_keep_them():
    """Two models that differ on 6 of 200 documents (same answers elsewhere): the paired SE is that of the mean
    per-document difference, far below the two-sample one, so +0.03 counts; without per-document results (or
    with other documents) the two-sample SE stands and it does not."""
    base = "01" * 100
    better = "11" * 6 + base[12:]  # documents 0, 2, ..., 10 turn right

    def ev(bits):
        acc = bits.count("1") / len(bits)
        return {"results": {"piqa": {"acc": acc}}, "n_samples": {"piqa": {"effective": len(bits)}},
                "per_doc": {"piqa": {"acc": bits}}}

    r = downstream.task_rows({"vanilla": ev(base), "kvshift": ev(better)}, ["piqa"])["piqa"]["kvshift"]
    d = [1] * 6 + [0] * 194
    mean = 6 / 200
    se = (sum((x - mean) ** 2 for x in d) / 199 / 200) ** 0.5
    assert r["paired"] and r["diff"] == pytest.approx(0.03) and r["diff_se"] == pytest.approx(se)
    assert r["significant"] and downstream.paired_se(ev(better), ev(base), "piqa", "acc") == pytest.approx(se)
    unpaired = ev(better) | {"per_doc": {}}
    r2 = downstream.task_rows({"vanilla": ev(base), "kvshift": unpaired}, ["piqa"])["piqa"]["kvshift"]
    assert not r2["paired"] and not r2["significant"] and r2["diff_se"] > 4 * se
    assert downstream.paired_se(ev(better), ev(base[:100]), "piqa", "acc") is None  # other documents


def test_downstream_from_evaluation_files(pair, tmp_path):
    """Models scored elsewhere (`kvshift eval --scores`): the arms are evaluation JSONs, the analyses must exist."""
    kw = dict(tasks=["piqa"], limit=4, name="tiny", device="cpu", batch_size=4)
    downstream.run(pair, eval_dir=tmp_path / "eval", out=tmp_path / "first", **kw)
    evals = {arm: next((tmp_path / "eval").glob(f"m-{arm}-*.json")) for arm in pair}
    for arm, f in evals.items():  # what `kvshift eval --scores` adds
        r = json.loads(f.read_text())
        r["scored"] = {"device_name": "NVIDIA H200", "dtype": "torch.bfloat16", "torch": "2.11", "requests_sha256": "x",
                       "model": f"rerun/runs/{arm}-s0", "weights_sha256": {}}
        f.write_text(json.dumps(r))
    out = tmp_path / "out"
    (out / "runs" / "kvshift-s0").mkdir(parents=True)
    (out / "analysis").mkdir()
    for arm in pair:  # the analyses made where the models were (scripts/device/downstream.sh)
        (tmp_path / "first" / "analysis" / f"tiny-{arm}").rename(out / "analysis" / f"tiny-{arm}")
    (out / "runs" / "kvshift-s0" / "summary.json").write_text(json.dumps(
        {"final_val_loss": 1.5, "tokens": 1000, "steps": 10, "tokens_per_s": 1.0, "status": "finished"}))
    s = downstream.run(downstream._arms([f"{a}={f}" for a, f in evals.items()]), out=out, **kw)
    assert s["exports"]["vanilla"]["model"] == "rerun/runs/vanilla-s0" and s["training"]["kvshift"]["final_val_loss"] == 1.5
    readme = (out / "README.md").read_text()
    assert "computed on NVIDIA H200 (torch.bfloat16, torch 2.11)" in readme and "| kvshift | 1.5000 | 1,000 | finished |" in readme
    with pytest.raises(FileNotFoundError, match="no head analysis"):
        downstream.run(evals, out=tmp_path / "o2", **kw)
    with pytest.raises(ValueError, match="does not hold"):
        downstream.run(evals, out=out, **{**kw, "limit": 5})
