"""The language-modelling experiments end to end on tiny shards (debug-size models, CPU), and their pure
analysis functions on hand-made inputs."""

import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from kvshift.experiments import lm
from kvshift.experiments.base import VERDICTS, RunOptions
from kvshift.experiments.cli import run_experiment
from kvshift.experiments.lm.spec import GQA, PAIR, plan, parts, select, shard_dir
from kvshift.experiments.lm.stats import below_fraction, coefficient_table, coefficient_values, fit_power_law
from kvshift.experiments.lm.verdicts import lr_failures, verdict_lr
from kvshift.train.testing import write_tiny_shards

REPO = Path(__file__).resolve().parents[2]
REQUIRED = {"experiment", "scale", "paper", "verdict", "verdict_text", "command", "git_commit", "device", "torch",
            "time_utc"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("lm-shards"), train_docs=400)


@pytest.fixture
def roots(tmp_path):
    return tmp_path


def _run(name, roots, shards, logs=None, **kw):
    kw.setdefault("out", roots / "results" / f"{name}-cpu")
    opts = RunOptions(runs=roots / "runs", shards=shards, log=(logs.append if logs is not None else lambda m: None),
                      **kw)
    return run_experiment(name, opts)


def _check_summary(out: Path, name: str) -> dict:
    s = json.loads((out / "summary.json").read_text())
    assert REQUIRED <= set(s), REQUIRED - set(s)
    assert s["experiment"] == name and s["scale"] == "cpu" and s["verdict"] in VERDICTS
    assert s["verdict_text"] and "\n" not in s["verdict_text"]
    assert (out / "plot.png").stat().st_size > 5000
    readme = (out / "README.md").read_text()
    assert s["verdict"] in readme and "Paper" in readme
    return s


def test_lm_main_and_shift_coefficients(shards, roots):
    out = roots / "results" / "lm-main-cpu"
    logs = []
    s = _run("lm-main", roots, shards, logs, steps=10)
    s = _check_summary(out, "lm-main")
    assert set(s["parts"]) == {"10m", "50m"}
    for part in ("10m", "50m"):
        st = s["parts"][part]
        assert st["arms"] == ["vanilla", "kvshift"]
        ps = st["per_seed"]["0"]["kvshift"]
        v, k = st["runs"]["vanilla"]["0"], st["runs"]["kvshift"]["0"]
        assert ps["diff"] == pytest.approx(k["final_val_loss"] - v["final_val_loss"])
        assert 0 <= ps["below_fraction"] <= 1 and v["epochs"] > 0 and v["tokens"] == 10 * 8 * 64
        # a fair pair: the configs differ in the attention kind only
        cv, ck = (json.loads((out / st["runs"][a]["0"]["run_dir"] / "config.json").read_text()) for a in PAIR)
        assert cv["model"].pop("attention") == "vanilla" and ck["model"].pop("attention") == "kvshift"
        cv["train"].pop("ckpt_every"), ck["train"].pop("ckpt_every")  # the coefficient arm checkpoints more often
        assert cv["model"] == ck["model"] and cv["optim"] == ck["optim"] and cv["train"] == ck["train"]
        assert cv["data"] == ck["data"]
    assert s["parts"]["50m"]["runs"]["kvshift"]["0"]["non_embedding_params"] > \
        5 * s["parts"]["10m"]["runs"]["kvshift"]["0"]["non_embedding_params"]
    assert not list(out.rglob("*.safetensors")), "checkpoints must stay out of results/"
    # the larger KV-shift model's coefficients at every checkpoint (every steps // 10 = 1 step)
    recs = (out / "runs/50m/kvshift-s0/coefficients.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in recs] == list(range(1, 11))
    assert len(list((roots / "runs/lm").glob("*/keep/step_00000001.safetensors"))) == 1
    # rerunning trains nothing
    logs.clear()
    _run("lm-main", roots, shards, logs, steps=10)
    assert sum("already in" in x for x in logs) == 4 and not any("training" in x for x in logs)
    # Table 4 reads the same 50m KV-shift run: found in the scratch directory, not trained again
    logs.clear()
    _run("shift-coefficients", roots, shards, logs, steps=10)
    assert any("copied" in x for x in logs) and not any("training" in x for x in logs)
    c = _check_summary(roots / "results" / "shift-coefficients-cpu", "shift-coefficients")
    heads = 3 * 4  # cpu "50m": 3 layers x 4 KV heads
    for tag, step in (("early", 1), ("final", 10)):
        r = c["checkpoints"][tag]
        assert r["step"] == step and sum(r["counts"].values()) == r["heads"] == heads
        assert all(len(v) == heads for v in r["values"].values())


def test_lm_lr_records_divergence(shards, roots):
    out = roots / "results" / "lm-lr-cpu"
    s = lm.run("lm-lr", RunOptions(runs=roots / "runs", shards=shards, steps=12, log=lambda m: None), out,
               lrs=(3e-3, 300.0))
    s = _check_summary(out, "lm-lr")
    assert set(s["by_lr"]) == {"lr=0.003", "lr=300"}
    hi = s["by_lr"]["lr=300"]
    assert hi["seeds"] == {"vanilla": 3, "kvshift": 3}
    assert hi["diverged"]["vanilla"] >= 1 and hi["diverged"]["kvshift"] >= 1  # lr 300 breaks both
    for arm in PAIR:
        for seed, r in s["parts"]["lr=300"]["runs"][arm].items():
            run = json.loads((out / r["run_dir"] / "summary.json").read_text())
            assert run["diverged"] == r["diverged"] and run["config"]["optim"]["lr"] == 300.0
            if r["diverged"]:
                assert run["steps"] < 12 and r["diverged_step"] is not None
    assert hi["failed"]["vanilla"] >= hi["diverged"]["vanilla"]
    assert s["by_lr"]["lr=0.003"]["diverged"] == {"vanilla": 0, "kvshift": 0}
    assert "failed vanilla" in s["verdict_text"]


def test_lr_failures_are_measured_against_the_same_arm_at_lr_1e3():
    run = lambda final, div=False: {"final_val_loss": final, "best_val_loss": final, "diverged": div}  # noqa: E731
    st = {"runs": {"vanilla": {"0": run(4.5), "1": run(None, True), "2": run(4.1)},
                   "kvshift": {"0": run(3.9), "1": run(4.0), "2": run(3.8)}}}
    ref = {"vanilla": 3.2, "kvshift": 3.1}  # final losses at lr 1e-3
    assert lr_failures(st, ref) == {"vanilla": {"0": True, "1": True, "2": False},
                                    "kvshift": {"0": False, "1": False, "2": False}}
    # below the reference rate a high loss is slow learning: only a divergence fails
    assert lr_failures(st, ref, above_ref=False) == {"vanilla": {"0": False, "1": True, "2": False},
                                                     "kvshift": {"0": False, "1": False, "2": False}}


def test_lr_verdict_needs_the_reference_and_reads_the_unclipped_part():
    def part(vloss, kloss, vdiv=False):
        runs = {"vanilla": {str(i): {"final_val_loss": v, "diverged": vdiv, "best_val_loss": v} for i, v in enumerate(vloss)},
                "kvshift": {str(i): {"final_val_loss": k, "diverged": False, "best_val_loss": k} for i, k in enumerate(kloss)}}
        agg = {a: {"final_val_loss": {"mean": sum(x for x in (r["final_val_loss"] for r in runs[a].values()) if x) /
                                      len(runs[a])}, "diverged": sum(r["diverged"] for r in runs[a].values())}
               for a in runs}
        per_seed = {str(i): {"kvshift": {"diff": k - v if v else None}} for i, (v, k) in enumerate(zip(vloss, kloss))}
        return {"runs": runs, "aggregate": agg, "per_seed": per_seed}

    stats = {"lr=0.0001": part([3.5], [3.2]), "lr=0.0002": part([2.8], [2.6]), "lr=0.001": part([2.3], [2.2]),
             "lr=0.01": part([2.4, 2.5], [2.3, 2.3]),
             "lr=0.01-noclip": part([5.0, 6.0, 4.0], [2.5, 2.6, 2.4])}
    v, text, extra = verdict_lr(stats, "gpu")
    assert v == "reproduced" and extra["top_lr_claim"] == {"lr=0.01": False, "lr=0.01-noclip": True}
    assert "lr=0.01-noclip yes" in text
    assert verdict_lr({"lr=0.01-noclip": stats["lr=0.01-noclip"]}, "gpu")[0] == "inconclusive"  # no reference rate


def test_reuses_identical_runs_across_experiments(shards, roots):
    logs = []
    _run("lm-seeds", roots, shards, logs, seeds=[0], arms=["vanilla"], steps=6)
    logs.clear()
    s = _run("lm-variants", roots, shards, logs, arms=["vanilla"], steps=6)
    assert any("copied" in x for x in logs) and not any("training" in x for x in logs)
    assert s["verdict"] == "inconclusive" and "not run yet" in s["verdict_text"]


def test_fit_power_law_recovers_parameters():
    n = [3e6, 1e7, 2.5e7, 5e7, 8.5e7]
    loss = [20.0 * x ** -0.25 + 1.5 for x in n]
    f = fit_power_law(n, loss, offset=True)
    assert f["b"] == pytest.approx(0.25, rel=0.05) and f["c"] == pytest.approx(1.5, abs=0.05)
    assert f["rmse"] < 1e-3
    g = fit_power_law(n, [7.0 * x ** -0.1 for x in n])
    assert g["a"] == pytest.approx(7.0, rel=1e-6) and g["b"] == pytest.approx(0.1, rel=1e-6) and g["c"] == 0.0
    with pytest.raises(ValueError, match="at least 4"):
        fit_power_law(n[:3], loss[:3], offset=True)


def test_coefficient_table_counts_heads():
    layers = [{"alpha": [[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]], "beta": [[0.6, 0.4], [0.1, 0.9], [0.2, 0.8]]},
              {"alpha": [[0.5, 0.5], [1.2, -0.2]], "beta": [[0.3, 0.7], [0.5, 0.5]]}]
    t = coefficient_table(layers)
    # heads: (>,>) (<=,<=) (>,<=) | (<=,<=) [ties count as <=] (>,<=)
    assert t["counts"] == {"a1>a2,b1>b2": 1, "a1>a2,b1<=b2": 2, "a1<=a2,b1>b2": 0, "a1<=a2,b1<=b2": 2}
    assert t["heads"] == 5 and t["diagonal"] == 3 and t["diagonal_fraction"] == pytest.approx(0.6)
    assert t["p_value"] == pytest.approx(sum(math.comb(5, k) for k in range(3, 6)) / 32)
    v = coefficient_values(layers)
    assert v["alpha1"] == [0.9, 0.2, 0.7, 0.5, 1.2] and v["beta2"] == [0.4, 0.9, 0.8, 0.7, 0.5]


def test_below_fraction_skips_the_start():
    base = [(10, 5.0), (20, 4.0), (30, 3.0), (40, 2.5)]
    arm = [(10, 6.0), (20, 3.9), (30, 3.1), (40, 2.4)]
    assert below_fraction(base, arm) == pytest.approx(2 / 4)  # below at 20 and 40 tokens
    assert below_fraction(base, arm, skip=0.3) == pytest.approx(2 / 3)  # 10 tokens <= 30% of 40 is skipped
    assert below_fraction(base, [(99, 1.0)]) is None


def test_missing_shards_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="kvshift data unpack cache/lm-pack.tar.xz"):
        shard_dir(tmp_path / "nope")


def test_selection_and_device_plan():
    ps = parts("lm-scaling", "gpu")
    assert [p.name for p, _, _ in select(ps)] == ["3m", "10m", "25m", "50m"]  # 85m only when asked
    assert [p.name for p, _, _ in select(ps, only="85m")] == ["85m"]
    with pytest.raises(ValueError, match="unknown parts"):
        select(ps, only="7m")
    with pytest.raises(ValueError, match="unknown arms"):
        select(ps, arms="kvshfit")
    lr = {p.name: seeds for p, _, seeds in select(parts("lm-lr", "gpu"))}
    assert lr == {"lr=0.0001": [0], "lr=0.0002": [0], "lr=0.001": [0], "lr=0.01": [0, 1, 2]}
    # every documented device command is estimated to fit a 10-minute call with margin
    rows = plan("gpu")
    assert len(rows) == 24 and all(secs < 9.5 * 60 for _, _, secs in rows)
    runbook = (REPO / "docs" / "gpu.md").read_text()
    for job, _, _ in rows:
        assert f'"{job}"' in runbook, job
    # the gpu sizes are the advertised ones (non-embedding parameters)
    from kvshift.models import ModelConfig
    n = {s: ModelConfig.from_name(f"lm-{s}").non_embedding_params() for s in ("3m", "10m", "25m", "50m")}
    assert n["50m"] / n["3m"] >= 10
    gqa = ModelConfig.from_name("lm-50m", **GQA["gpu"])
    assert gqa.n_kv_heads * 4 == gqa.n_heads and abs(gqa.non_embedding_params() / n["50m"] - 1) < 0.05


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_device_script_smoke(shards, tmp_path):
    """scripts/device/lm.sh on CPU: the gpu-scale config path with a 2-step, 1 x 32-token budget."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "BUDGET": "300"}
    work = tmp_path / "tree"
    (work / "results").mkdir(parents=True)
    (work / "cache").mkdir()
    (work / "cache" / "lm-shards").symlink_to(shards)
    (work / "scripts").symlink_to(REPO / "scripts")
    (work / "src").symlink_to(REPO / "src")
    job = ("lm-main --only 10m --steps 2 --set data.batch_size=1 --set data.seq_len=32 --set train.eval_batches=1 "
           "--set train.compile=false")
    r = subprocess.run(["bash", "scripts/device/lm.sh", job], cwd=work, env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads((work / "results/lm-main-gpu/summary.json").read_text())
    assert s["scale"] == "gpu" and s["command"].startswith("kvshift experiment lm-main --only 10m --steps 2")
    assert s["parts"]["10m"]["runs"]["kvshift"]["0"]["non_embedding_params"] > 10e6  # the real lm-10m model
    assert (tmp_path / "out/results.tgz").stat().st_size > 1000
    # the next call on the warm machine: results/ is the carried tree's again (the device resets it), runs/ is
    # kept; a job of other runs still summarises and returns every run the machine published
    shutil.rmtree(work / "results")
    (work / "results").mkdir()
    shutil.rmtree(work / "runs/lm")  # not trained again from the scratch copy: restored from runs/published
    job2 = job.replace("--only 10m", "--only 50m --arms vanilla")
    r = subprocess.run(["bash", "scripts/device/lm.sh", job2], cwd=work, env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads((work / "results/lm-main-gpu/summary.json").read_text())
    assert set(s["parts"]) == {"10m", "50m"} and set(s["parts"]["10m"]["runs"]) == {"vanilla", "kvshift"}
    with tarfile.open(tmp_path / "out/results.tgz") as tf:
        names = tf.getnames()
    assert {f"results/lm-main-gpu/runs/{p}/summary.json" for p in ("10m/vanilla-s0", "10m/kvshift-s0",
                                                                    "50m/vanilla-s0")} <= set(names)
