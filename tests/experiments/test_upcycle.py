"""The upcycle experiment at cpu scale on a tiny random Llama converted with the identity shift."""

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from kvshift.experiments import upcycle as U  # noqa: E402
from kvshift.experiments import upcycle_heads as H  # noqa: E402
from kvshift.experiments.base import RunOptions  # noqa: E402
from kvshift.experiments.cli import run_experiment  # noqa: E402
from kvshift.models import LM  # noqa: E402
from kvshift.train.data import make_sources  # noqa: E402
from kvshift.train.init import init_from  # noqa: E402
from kvshift.train.testing import write_tiny_shards  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("upcycle")
    shards = write_tiny_shards(root / "shards", vocab_size=97)
    model = U.tiny_llama(root / "model", 97, seed=3)
    return root, shards, model


def _opts(root, shards, model, **kw):
    return RunOptions(scale="cpu", runs=root / "runs", shards=shards, inputs=[f"model={model}"], log=lambda s: None, **kw)


def _configs(setup, seed=0):
    root, shards, model = setup
    fields = U.model_fields(model)
    return {arm: U.run_config("cpu", model, fields, arm, seed, shards) for arm in U.ARMS}


def test_end_to_end(setup):
    root, shards, model = setup
    out = root / "results"
    s = run_experiment("upcycle", _opts(root, shards, model, seeds=[0, 1], out=out))
    assert s["verdict"] in ("reproduced", "partly reproduced", "not reproduced")  # 2 seeds: a verdict
    assert s["identical_start"] is True and len(s["diff"]) == 2
    assert set(s["runs"]) == set(U.ARMS) and all(set(by) == {"0", "1"} for by in s["runs"].values())
    for arm, by in s["runs"].items():
        for r in by.values():
            assert r["status"] == "finished" and r["tokens"] == 12 * 4 * 32 and r["tokens_per_s"] > 0
            assert {"all", "prose", "code"} <= set(r["final"]) and r["final"]["all"] < r["start"]["all"]
    van = s["runs"]["vanilla"]["0"]["coefficients"]
    assert van["max_abs_change"] == 0.0 and van["k_heads_moved"] == van["v_heads_moved"] == 0
    kv = s["runs"]["kvshift"]["0"]["coefficients"]
    assert kv["max_abs_change"] > 0 and kv["heads"] == 4 and len(kv["per_layer"]) == 2
    ks = s["runs"]["kshift"]["0"]["coefficients"]
    assert ks["v_heads_moved"] == 0 and all(r["v_max_share"] == 0.0 for r in ks["per_layer"])
    # the fast arm: same model and data, only the coefficients' rate differs, and they move further
    cfgs = _configs(setup)
    assert cfgs["kvshift-fast"].optim.shift_lr_mult == U.FAST_SHIFT_LR_MULT != cfgs["kvshift"].optim.shift_lr_mult
    fast = s["runs"]["kvshift-fast"]["0"]["coefficients"]
    assert fast["max_abs_change"] > kv["max_abs_change"]
    assert set(s["other_arms_diff"]) == {"kshift", "kvshift-fast"} and "kvshift-fast − vanilla" in s["verdict_text"]
    # heads before (the source model, once) and after (each run's final checkpoint, published with the run)
    src = json.loads((out / "source-analysis.json").read_text())
    assert src["prefix_token"] == 0 and len(src["scores"]["prefix_matching"]) == 2  # the tiny Llama's BOS; 2 layers
    assert s["source_heads"]["heads"] == 8 and 0 <= s["source_heads"]["max_prefix_matching"] <= 1
    for arm, by in s["runs"].items():
        for k, r in by.items():
            h = r["heads"]
            assert h["heads"] == 8 and h["induction_heads"] == sum(
                x >= H.HEAD_SCORE for row in json.loads((out / "runs" / f"{arm}-s{k}" / "analysis.json").read_text())
                ["scores"]["prefix_matching"] for x in row)
    van_rep = json.loads((out / "runs" / "vanilla-s0" / "analysis.json").read_text())
    assert van_rep["scores"] != src["scores"]  # analysed after training, not the source again
    for f in ("summary.json", "README.md", "plot.png"):
        assert (out / f).is_file()
    src_line = f"Source model before training: {s['source_heads']['induction_heads']}/8 induction heads"
    assert src_line in (out / "README.md").read_text()
    # a published run without its analysis (trained before it existed) still summarizes, with empty head cells;
    # a temporary directory a cut publish left behind is not a run
    (out / "runs" / "kvshift-s1" / "analysis.json").unlink()
    (out / "runs" / "kvshift-s0.tmp").mkdir()
    again = U.summarize(_opts(root, shards, model, seeds=[0, 1], out=out), out)
    assert again["runs"]["kvshift"]["1"]["heads"] is None and "— | —" in (out / "README.md").read_text()
    assert set(U.published_runs(out, root / "runs")) == {f"{a}-s{k}" for a in U.ARMS for k in (0, 1)}
    shutil.rmtree(out / "runs" / "kvshift-s0.tmp")
    assert not list((root / "runs" / "upcycle").glob("*/checkpoints"))  # checkpoints are not kept
    # a second run finds every run done and trains nothing
    again = run_experiment("upcycle", _opts(root, shards, model, seeds=[0, 1], out=out))
    assert again["diff"] == s["diff"]
    # the runs the device scores (scripts/device/upcycle.sh SCORE): exactly the published ones, by key
    pub = U.published_runs(out, root / "runs")
    assert set(pub) == {f"{a}-s{k}" for a in U.ARMS for k in (0, 1)}
    for name, rd in pub.items():
        assert json.loads((rd / "run.json").read_text())["key"] == json.loads((out / "runs" / name / "run.json").read_text())["key"]


def test_arms_start_with_identical_logits(setup):
    from transformers import AutoModelForCausalLM

    import kvshift.hf  # noqa: F401  (registers the Auto classes)

    _, _, model = setup
    ids = torch.randint(0, 97, (2, 24))
    ref = AutoModelForCausalLM.from_pretrained(model).eval()(ids).logits
    for arm, cfg in _configs(setup).items():
        lm = LM(cfg.model_config(), seed=123)
        init_from(lm, model)
        assert cfg.model_config().attention == U.ARMS[arm]
        with torch.no_grad():
            assert torch.allclose(lm.eval()(ids), ref, atol=1e-5), arm
        names = [n for n, _ in lm.named_parameters() if "shift_" in n]
        assert len(names) == {"vanilla": 0, "kvshift": 4, "kshift": 2, "kvshift-fast": 4}[arm]  # vanilla: no coefficient at all


def test_arms_share_data_order_optimizer_and_schedule(setup):
    cfgs = _configs(setup)
    dicts = {a: c.to_dict() for a, c in cfgs.items()}
    for a, d in dicts.items():
        opt = {**d["optim"], "shift_lr_mult": dicts["vanilla"]["optim"]["shift_lr_mult"]}  # the one declared difference
        assert d["data"] == dicts["vanilla"]["data"] and opt == dicts["vanilla"]["optim"]
        assert d["optim"]["shift_lr_mult"] == U.ARM_SHIFT_LR_MULT.get(a, U.SHIFT_LR_MULT)
        assert d["train"] == dicts["vanilla"]["train"]
        assert {k: v for k, v in d["model"].items() if k not in ("attention", "name")} == \
            {k: v for k, v in dicts["vanilla"]["model"].items() if k not in ("attention", "name")}
    assert cfgs["kvshift"].optim.shift_lr_mult == U.SHIFT_LR_MULT
    batches = {a: make_sources(c.data, 97, 0, 1)[0].batch(5)["input_ids"] for a, c in cfgs.items()}
    assert all(torch.equal(b, batches["vanilla"]) for b in batches.values())
    other = make_sources(_configs(setup, seed=1)["vanilla"].data, 97, 0, 1)[0].batch(5)["input_ids"]
    assert not torch.equal(other, batches["vanilla"])  # the seed is the data order


def test_verdict_rule():
    def runs(diffs, base=3.0, jitter=0.01):
        r = {"vanilla": {}, "kvshift": {}}
        for s, d in enumerate(diffs):
            v = base + jitter * s
            r["vanilla"][s] = {"status": "finished", "final": {"all": v}, "tokens": 1000}
            r["kvshift"][s] = {"status": "finished", "final": {"all": v + d}, "tokens": 1000}
        return r

    assert U.verdict(runs([-0.05, -0.06]))[0] == "reproduced"
    assert U.verdict(runs([-0.05, 0.001]))[0] == "partly reproduced"
    assert U.verdict(runs([-0.001, -0.002], jitter=0.05))[0] == "partly reproduced"  # below, within the spread
    assert U.verdict(runs([0.01, -0.001]))[0] == "not reproduced"
    v, text, _ = U.verdict(runs([-0.5]))
    assert v == "inconclusive" and "seed 0: kvshift − vanilla final held-out loss -0.5000 (3.0000 → 2.5000" in text


def test_coefficient_movement_definition():
    layers = [{"alpha": [[1.0, 0.0], [0.8, 0.2]], "beta": [[0.95, 0.05], [1.0, 0.0]]}]
    m = H.coefficient_movement(layers)
    assert m["k_heads_moved"] == 1 and m["v_heads_moved"] == 0 and m["heads"] == 2
    assert m["max_abs_change"] == pytest.approx(0.2)


def test_bad_inputs(setup, tmp_path):
    root, shards, model = setup
    with pytest.raises(ValueError, match="model=DIR"):
        run_experiment("upcycle", RunOptions(scale="cpu", runs=tmp_path, shards=shards, inputs=["weights=x"],
                                             out=tmp_path / "o"))
    with pytest.raises(ValueError, match="not a converted model"):
        run_experiment("upcycle", _opts(tmp_path, shards, tmp_path, out=tmp_path / "o"))
    with pytest.raises(ValueError, match="no such file"):
        run_experiment("upcycle", RunOptions(scale="cpu", runs=tmp_path, shards=shards, inputs=["gguf=none.gguf"],
                                             out=tmp_path / "o"))
    with pytest.raises(ValueError, match="needs the pretrained model"):
        run_experiment("upcycle", RunOptions(scale="gpu", runs=tmp_path, shards=shards, out=tmp_path / "o"))
    with pytest.raises(ValueError, match="unknown arms"):
        run_experiment("upcycle", _opts(tmp_path, shards, model, arms=["gate"], out=tmp_path / "o"))
    other = write_tiny_shards(tmp_path / "s98", vocab_size=98)
    with pytest.raises(ValueError, match="vocabulary 98"):
        run_experiment("upcycle", _opts(tmp_path, other, model, out=tmp_path / "o"))
    with pytest.raises(ValueError, match="no token shards"):
        run_experiment("upcycle", _opts(tmp_path, tmp_path / "none", model, out=tmp_path / "o"))
    (tmp_path / "m").mkdir()
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "m" / f).write_bytes((model / f).read_bytes())
    (tmp_path / "m" / "tokenizer.json").write_text(json.dumps({"other": 1}))
    with pytest.raises(ValueError, match="another tokenizer"):
        run_experiment("upcycle", _opts(tmp_path, shards, tmp_path / "m", out=tmp_path / "o"))


def test_a_tokenizer_serialised_differently_is_accepted_when_it_encodes_alike(tmp_path):
    """transformers versions write the same tokenizer.json with different bytes: the shards' own copy is
    compared with the model's by what they encode; a tokenizer that encodes differently is still refused."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from kvshift.train.testing import write_tiny_shards
    from kvshift.utils.io import file_sha256

    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "capital", "of", "france", "is", "paris", "."])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    shards = write_tiny_shards(tmp_path / "s", vocab_size=len(vocab))
    tok.save(str(shards / "tokenizer.json"))
    meta = json.loads((shards / "meta.json").read_text())
    meta["tokenizer_sha256"] = file_sha256(shards / "tokenizer.json")
    (shards / "meta.json").write_text(json.dumps(meta))
    model = tmp_path / "m"
    model.mkdir()
    fields = {"vocab_size": len(vocab)}
    same = json.loads((shards / "tokenizer.json").read_text())
    (model / "tokenizer.json").write_text(json.dumps(same, indent=4, sort_keys=True))  # other bytes, same tokenizer
    assert file_sha256(model / "tokenizer.json") != meta["tokenizer_sha256"]
    U.check_match(model, shards, fields)
    vocab2 = dict(vocab, paris=2, capital=6)  # two ids swapped: encodes differently
    t2 = Tokenizer(models.WordLevel(vocab2, unk_token="[UNK]"))
    t2.pre_tokenizer = pre_tokenizers.Whitespace()
    t2.save(str(model / "tokenizer.json"))
    with pytest.raises(ValueError, match="another tokenizer"):
        U.check_match(model, shards, fields)
    (shards / "tokenizer.json").unlink()  # nothing to compare with: refused, saying so
    (model / "tokenizer.json").write_text(json.dumps(same, indent=4, sort_keys=True))
    with pytest.raises(ValueError, match="keep no tokenizer.json"):
        U.check_match(model, shards, fields)


def test_device_script_reassembles_or_refuses(tmp_path):
    """scripts/device/upcycle.sh joins the carried parts only when every part matches its sha256."""
    import os
    import subprocess
    from pathlib import Path

    from kvshift.data.parts import split_file

    repo = Path(__file__).resolve().parents[2]
    (tmp_path / "src").symlink_to(repo / "src")
    (tmp_path / "scripts").symlink_to(repo / "scripts")
    g = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    g.write_bytes(b"GGUF" + os.urandom(3000))
    split_file(g, tmp_path / "cache/upcycle/gguf", part_bytes=2000)
    (tmp_path / "cache/upcycle/gguf" / f"{g.name}.part1").unlink()  # call 2 has not arrived
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": os.sys.executable}
    r = subprocess.run(["bash", "scripts/device/upcycle.sh", "stage"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "part0" in r.stdout
    r = subprocess.run(["bash", "scripts/device/upcycle.sh", "run"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "part missing" in r.stderr and "incomplete" in r.stderr
    assert not (tmp_path / "cache/upcycle" / g.name).exists()


def test_gpu_scale_config_for_smollm2(tmp_path):
    """The gpu runs: SmolLM2-135M's shape, seq 2048, 59M tokens per arm, coefficients at 10x the rate."""
    fields = dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, max_seq_len=8192,
                  rope_base=100000.0, norm_eps=1e-5, tie_embeddings=True, shift_window=1)
    shards = write_tiny_shards(tmp_path / "s", vocab_size=49152, train_docs=5, val_docs=2)
    cfgs = {a: U.run_config("gpu", tmp_path / "m", fields, a, 0, shards) for a in U.ARMS}
    c = cfgs["kvshift"]
    assert c.data.seq_len * c.data.batch_size * c.train.steps == 1800 * 32768
    assert c.optim.shift_lr_mult == 10 and c.optim.schedule == "cosine" and c.train.dtype == "auto"
    assert c.train.init_from == str(tmp_path / "m") and c.train.ckpt_every == 600
    mc = c.model_config()
    assert (mc.n_layers, mc.n_kv_heads, mc.tie_embeddings, mc.attention) == (30, 3, True, "kvshift")
    assert cfgs["vanilla"].model_config().non_embedding_params() == mc.non_embedding_params() - 30 * 2 * 3 * 2


def test_a_failed_head_analysis_costs_the_counts_not_the_run(setup, tmp_path, monkeypatch):
    root, shards, model = setup

    def boom(*a, **k):
        raise RuntimeError("analysis exploded")

    monkeypatch.setattr(H, "write_report", boom)
    logs = []
    opts = RunOptions(scale="cpu", runs=tmp_path / "runs", shards=shards, inputs=[f"model={model}"], log=logs.append,
                      arms=["vanilla", "kvshift"], seeds=[0], out=tmp_path / "o", keep_checkpoints=True)
    s = run_experiment("upcycle", opts)
    assert all(s["runs"][a]["0"]["status"] == "finished" and s["runs"][a]["0"]["heads"] is None
               for a in ("vanilla", "kvshift"))
    assert s["source_heads"] is None and not (tmp_path / "o" / "source-analysis.json").exists()
    assert sum("analysis exploded" in m for m in logs) == 3  # the source model and both runs, each logged
