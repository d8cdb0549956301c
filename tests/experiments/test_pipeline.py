"""The device scripts that train (scaling.sh, batch.sh) run here on the CPU, and the pipeline summaries
read what they write."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from kvshift.experiments import pipeline
from kvshift.experiments.base import RunOptions
from kvshift.experiments.cli import run_experiment
from kvshift.train.testing import write_tiny_shards

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("pipe-shards"), train_docs=300)


def _env(tmp_path, shards):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"), SHARDS=str(shards),
               SCALING_RUNS=str(tmp_path / "scaling-runs"), OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def test_scaling_script_and_summary(tmp_path, shards):
    vocab = json.loads((shards / "meta.json").read_text())["vocab_size"]
    r = subprocess.run(["bash", "scripts/device/scaling.sh", "debug", "4", "data.seq_len=32", "data.batch_size=2",
                        f"model.vocab_size={vocab}", "train.threads=1"],
                       cwd=REPO, env=_env(tmp_path, shards), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    src = tmp_path / "out" / "scaling"
    assert {p.name for p in src.iterdir()} == {"1gpu", "2gpu-ddp", "2gpu-fsdp2"}
    res = pipeline.scaling(src, tmp_path / "pipe")
    m = res["modes"]
    assert m["1gpu"]["world_size"] == 1 and m["2gpu-ddp"]["world_size"] == 2 and m["2gpu-ddp"]["parallel"] == "ddp"
    assert m["2gpu-fsdp2"]["parallel"] == "fsdp" and m["1gpu"]["scaling_efficiency"] == pytest.approx(1.0)
    for v in m.values():
        assert v["tokens_per_s_per_gpu"] == pytest.approx(v["tokens_per_s"] / v["world_size"])
        assert v["steps"] == 4 and v["tokens"] == 4 * 2 * 32 * v["world_size"]
    assert (tmp_path / "pipe" / "scaling.png").stat().st_size > 5000
    assert "| 2gpu-ddp | 2 | ddp |" in (tmp_path / "pipe" / "README.md").read_text()


def test_scaling_summary_needs_the_one_gpu_run(tmp_path):
    (tmp_path / "2gpu-ddp").mkdir()
    (tmp_path / "2gpu-ddp" / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="1gpu"):
        pipeline.scaling(tmp_path, tmp_path / "pipe")
    (tmp_path / "1gpu").mkdir()
    (tmp_path / "1gpu" / "summary.json").write_text("{not json")
    with pytest.raises(ValueError, match="1gpu/summary.json"):
        pipeline.scaling(tmp_path, tmp_path / "pipe")


def test_sizes_from_lm_runs(tmp_path, shards):
    out = tmp_path / "results" / "lm-scaling-cpu"
    run_experiment("lm-scaling", RunOptions(steps=6, out=out, runs=tmp_path / "runs", shards=shards,
                                            only=["3m", "10m"], log=lambda *_: None))
    res = run_experiment("pipeline", RunOptions(out=tmp_path / "pipe", inputs=[f"sizes={out / 'runs'}"]))["sizes"]
    assert list(res["sizes"]) == ["3m", "10m"]  # ordered by size
    for arms in res["sizes"].values():
        assert set(arms) == {"vanilla-s0", "kvshift-s0"}
        for r in arms.values():
            assert r["status"] == "finished" and r["tokens_per_s"] > 0 and r["final_val_loss"] > 0
    readme = (tmp_path / "pipe" / "README.md").read_text()
    assert "| 3m | vanilla-s0 |" in readme and (tmp_path / "pipe" / "loss.png").stat().st_size > 5000
    with pytest.raises(ValueError, match="--only"):
        pipeline.sizes(out / "runs", ["85m"], tmp_path / "pipe")
    with pytest.raises(FileNotFoundError, match="--input sizes="):
        pipeline.sizes(tmp_path / "nowhere", None, tmp_path / "pipe")
    with pytest.raises(ValueError, match="sizes=DIR or scaling=DIR"):
        run_experiment("pipeline", RunOptions(out=tmp_path / "pipe", inputs=[f"size={out}"]))


def test_batch_script_packs_new_results_and_logs(tmp_path):
    """batch.sh runs each job with its own GPU list and OUT, and packs only files written since it started
    (not the jobs' own results.tgz, not toy model weights) into $OUT/batch.tgz."""
    res = REPO / "results" / "zz-batch-test"
    env = dict(os.environ, OUT=str(tmp_path / "out"), LM_PACK=str(tmp_path / "no-pack.tar.xz"))
    jobs = [f"0|echo gpus=$CUDA_VISIBLE_DEVICES; mkdir -p {res}/models && echo 1 > {res}/a.json "
            f"&& echo w > {res}/models/w.bin && echo x > $OUT/results.tgz && echo keep > $OUT/note.txt",
            "2,3|echo gpus=$CUDA_VISIBLE_DEVICES; sleep 30"]
    try:
        r = subprocess.run(["bash", "scripts/device/batch.sh", "8", *jobs], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        with tarfile.open(tmp_path / "out" / "batch.tgz") as t:
            names = set(t.getnames())
            log0 = t.extractfile("batch/job0/log").read().decode()
            log1 = t.extractfile("batch/job1/log").read().decode()
    finally:
        subprocess.run(["rm", "-rf", str(res)])
    assert "results/zz-batch-test/a.json" in names and "batch/job0/note.txt" in names
    assert not any(n.endswith(("results.tgz", "w.bin")) for n in names)
    assert not any(n.startswith("results/") and "zz-batch-test" not in n for n in names)  # nothing older
    assert "gpus=0" in log0 and "== exit 0" in log0
    assert "gpus=2,3" in log1 and "== exit 124" in log1  # killed at the deadline


def test_scaling_efficiency_is_per_gpu(tmp_path):
    for mode, tps, world, par in (("1gpu", 100.0, 1, "none"), ("2gpu-ddp", 180.0, 2, "ddp")):
        (tmp_path / mode).mkdir()
        (tmp_path / mode / "summary.json").write_text(json.dumps(
            {"tokens_per_s": tps, "world_size": world, "parallel": par, "mfu": 0.4 * tps / 100}))
    m = pipeline.scaling(tmp_path, tmp_path / "pipe")["modes"]
    assert m["2gpu-ddp"]["scaling_efficiency"] == pytest.approx(0.9)
    assert m["2gpu-ddp"]["tokens_per_s_per_gpu"] == pytest.approx(90.0)
    assert "| 2gpu-ddp | 2 | ddp | 180 | 90 | 90.0% | 72.0% |" in (tmp_path / "pipe" / "README.md").read_text()
