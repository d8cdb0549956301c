"""Offloaded evaluation: record lm-eval's requests, score them elsewhere (torch only), replay them through
lm-eval; the replay must give exactly the metrics of a direct lm-eval run of the same model."""

import json

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from kvshift.cli import main  # noqa: E402
from kvshift.eval.harness import run_eval  # noqa: E402
from kvshift.eval.requests import Requests  # noqa: E402

TASKS = "lambada,piqa,hellaswag"


@pytest.fixture(scope="module")
def offloaded(exported, tmp_path_factory):
    d, _, _ = exported
    t = tmp_path_factory.mktemp("offload")
    req, sc = t / "requests.npz", t / "scores.npz"
    assert main(["eval", str(d), "--tasks", TASKS, "--limit", "6", "--record", str(req), "--max-length", "192"]) == 0
    # small batches: several widths, right padding and lambada contexts longer than the model's context
    assert main(["eval-score", str(d), str(req), "--out", str(sc), "--device", "cpu", "--batch-tokens", "300"]) == 0
    return d, req, sc


def test_recorded_requests_are_lm_evals(offloaded):
    d, req_path, _ = offloaded
    req = Requests.load(req_path)
    # lambada: 6 requests; piqa: 6 x 2 choices; hellaswag: 6 x 4 endings sharing 6 contexts
    assert len(req) == 6 + 12 + 24 and req.meta["max_length"] == 192
    assert req.meta["tasks"] == TASKS.split(",") and req.meta["limit"] == 6
    assert len(req.ctx_off) - 1 < len(req)  # hellaswag's contexts stored once
    lengths = [len(req.context(i)) + len(req.continuation(i)) for i in range(len(req))]
    assert max(lengths) > req.meta["max_length"] + 1  # truncation from the left is exercised


def test_replay_equals_direct_evaluation(offloaded, tmp_path):
    d, req, sc = offloaded
    direct = run_eval(str(d), TASKS.split(","), limit=6, device="cpu", batch_size=4, max_length=192)
    out = tmp_path / "replay.json"
    assert main(["eval", str(d), "--tasks", TASKS, "--limit", "6", "--scores", str(sc), "--requests", str(req),
                 "--out", str(out), "--max-length", "192"]) == 0
    replay = json.loads(out.read_text())
    for task, m in direct["results"].items():
        for k, v in m.items():
            if isinstance(v, float):
                assert replay["results"][task][k] == pytest.approx(v, rel=1e-5, abs=1e-9), (task, k)
    assert replay["scored"]["n_requests"] == 42 and replay["model"] == str(d)
    assert replay["n_samples"] == direct["n_samples"]


def test_replay_refuses_requests_it_does_not_have(offloaded, tmp_path):
    d, req, sc = offloaded
    with pytest.raises(ValueError, match="not in the scores' requests"):
        run_eval(str(d), ["lambada"], limit=7, scores=sc, requests=req, device="cpu", max_length=192)
    other = tmp_path / "other.npz"
    r = Requests.load(req)
    r.meta["limit"] = 5
    r.save(other)
    with pytest.raises(ValueError, match="other requests"):
        run_eval(str(d), ["lambada"], limit=6, scores=sc, requests=other, device="cpu", max_length=192)
    with pytest.raises(ValueError, match="needs requests"):
        run_eval(str(d), ["lambada"], scores=sc, device="cpu")


def test_scores_file_and_cli_errors(offloaded, tmp_path, capsys):
    d, req, sc = offloaded
    z = np.load(sc)
    meta = json.loads(str(z["meta"]))
    assert meta["n_requests"] == 42 and meta["weights_sha256"] and np.isfinite(z["logprob"]).all()
    assert (z["logprob"] < 0).all()
    assert main(["eval-score", str(d), str(tmp_path / "missing.npz"), "--out", str(tmp_path / "s.npz")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros(2))
    assert main(["eval-score", str(d), str(bad), "--out", str(tmp_path / "s.npz")]) == 2
    assert "not a requests file" in capsys.readouterr().err
