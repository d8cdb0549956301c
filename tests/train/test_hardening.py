"""Hostile inputs to `kvshift train` (the hardening issue): a refused launch changes nothing in the run
directory and says why in one line; no silent wrong results."""

import json

import pytest

from kvshift.cli import main
from kvshift.errors import UserError
from kvshift.train.checkpoint import list_checkpoints
from kvshift.train.config import load_config
from kvshift.train.metrics import read_metrics
from kvshift.train.resume import config_changes
from kvshift.train.trainer import train

SETS = ["train.steps=12", "train.ckpt_every=4", "train.eval_every=6"]


def _quiet(*_):
    pass


def _snapshot(run):
    """Bytes of every file of a run directory, by relative path."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture
def run(tmp_path):
    out = tmp_path / "run"
    s = train(load_config("debug", SETS), out, log=_quiet)
    assert s["status"] == "finished" and s["steps"] == 12
    return out


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


# ---- 1. --resume compares the checkpoint's config with the new one ---------------------------------
@pytest.mark.parametrize("change,named", [
    (["model.dim=64", "model.n_heads=4"], "model.dim 48 -> 64"),
    (["model.attention=vanilla"], "model.attention 'kvshift' -> 'vanilla'"),
    (["optim.lr=0.01"], "optim.lr 0.003 -> 0.01"),
    (["data.batch_size=8"], "global batch"),
    (["data.seed=1"], "data.seed 0 -> 1"),
    (["data.seq_len=16"], "data.seq_len 32 -> 16"),
    (["train.seed=3"], "train.seed 0 -> 3"),
], ids=["model-dim", "attention", "lr", "batch", "data-seed", "seq-len", "init-seed"])
def test_resume_refuses_a_changed_config_and_writes_nothing(run, capsys, change, named):
    before = _snapshot(run)
    argv = ["train", "debug", "--out", str(run), "--resume"]
    for s in SETS + ["train.steps=20"] + change:
        argv += ["--set", s]
    assert main(argv) == 2
    err = _err(capsys)
    assert named in err and "step_00000012" in err, err
    assert _snapshot(run) == before  # config.json, command.txt, metrics.jsonl, checkpoints: untouched


def test_resume_names_every_changed_key(run):
    with pytest.raises(UserError) as e:
        train(load_config("debug", SETS + ["optim.lr=0.01", "optim.warmup=7", "data.seed=2"]), run, resume=True,
              log=_quiet)
    assert all(k in str(e.value) for k in ("optim.lr", "optim.warmup", "data.seed"))


def test_resume_allows_longer_runs_and_another_cadence(run):
    s = train(load_config("debug", ["train.steps=16", "train.ckpt_every=8", "train.eval_every=8", "train.keep_last=3",
                                    "train.log_every=2", "train.eval_batches=1"]), run, resume=True, log=_quiet)
    assert s["status"] == "finished" and s["resumed_from"].endswith("step_00000012") and s["steps"] == 16
    assert s["tokens"] == 16 * 4 * 32  # batch 4 x seq 32 throughout: the token count is right
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 13)) + [14, 16]


def test_global_batch_may_be_split_differently():
    old = {**load_config("debug", ["data.batch_size=2"]).to_dict()}
    new_cfg = load_config("debug", ["data.batch_size=4"])
    new = {**new_cfg.to_dict(), "model_config": new_cfg.model_config().to_dict()}
    old["model_config"] = new["model_config"]
    assert config_changes(old, new, old_world=2, new_world=1) == []  # 2 ranks x 2 rows == 1 rank x 4 rows
    assert config_changes(old, new, old_world=1, new_world=1) == [
        "global batch (data.batch_size x data.grad_accum x world size) 2x1x1=2 -> 4x1x1=4"]
    ga = load_config("debug", ["data.batch_size=1", "data.grad_accum=2"]).to_dict()
    assert config_changes({**ga, "model_config": new["model_config"]}, new, old_world=2, new_world=1) == []


# ---- 2. data.shard_dir with data.kind = "synthetic" ------------------------------------------------
def test_shard_dir_with_synthetic_kind_is_refused(tmp_path, shards, capsys):
    with pytest.raises(UserError, match=r"data.shard_dir.*ignored.*data.kind = 'shards'"):
        load_config("debug", [f"data.shard_dir={shards}"])
    out = tmp_path / "run"
    assert main(["train", "debug", "--out", str(out), "--set", f"data.shard_dir={shards}"]) == 2
    assert "data.kind" in _err(capsys) and not out.exists()
    assert load_config("debug", [f"data.shard_dir={shards}", "data.kind=shards"]).data.kind == "shards"
    assert load_config("debug", [f"data.shard_dir={shards}", "data.kind=auto"]).data.kind == "shards"


# ---- 4. no verifying checkpoint: refuse instead of restarting and truncating metrics.jsonl ----------
def test_resume_with_only_broken_checkpoints_is_refused(run, capsys):
    ckpts = list_checkpoints(run / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000008", "step_00000012"]
    for p in ckpts:  # flip one byte of each: the sha256 in the manifest no longer matches
        w = p / "model.safetensors"
        b = bytearray(w.read_bytes())
        b[-1] ^= 1
        w.write_bytes(bytes(b))
    before = _snapshot(run)
    assert len(read_metrics(run / "metrics.jsonl")) == 12
    argv = ["train", "debug", "--out", str(run), "--resume"] + [a for s in SETS for a in ("--set", s)]
    assert main(argv) == 2
    err = _err(capsys)
    assert "none of the 2 checkpoints" in err and "step_00000008/model.safetensors" in err
    assert "step_00000012/model.safetensors" in err and "sha256" in err
    assert _snapshot(run) == before  # 12 records kept, nothing rewritten


@pytest.mark.parametrize("resume", [True, False], ids=["resume", "fresh"])
def test_metrics_without_checkpoints_are_not_truncated(run, resume):
    import shutil

    shutil.rmtree(run / "checkpoints")
    before = _snapshot(run)
    with pytest.raises(UserError, match=r"no checkpoint, but its metrics.jsonl records 12 steps up to step 12.*remove"):
        train(load_config("debug", SETS), run, resume=resume, log=_quiet)
    assert _snapshot(run) == before


def test_killed_before_the_first_checkpoint_starts_from_scratch(tmp_path):
    """Records up to the first checkpoint's step are a run killed before it wrote one: nothing to keep
    (the kill test relies on this)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 9.0}) + "\n" for i in (1, 2, 3, 4)))
    lines = []
    s = train(load_config("debug", SETS), out, resume=True, log=lines.append)
    assert s["status"] == "finished" and any("from scratch" in x for x in lines)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 13))
    assert all(r["loss"] != 9.0 for r in read_metrics(out / "metrics.jsonl"))


# ---- 5, 7. config values: one line naming the file and the field ------------------------------------
@pytest.mark.parametrize("override,named", [
    ("optim.lr=fast", "optim.lr must be a finite number, got 'fast'"),
    ("optim.lr=inf", "optim.lr must be a finite number, got inf"),
    ("optim.eps=nan", "optim.eps must be a finite number, got nan"),
    ("data.seq_len=256", "data.seq_len = 256 is longer than the model's max_seq_len = 128"),
    ("model.rope_base=x", "model.rope_base must be a finite number"),
    ("model.dim=3.5", "model.dim must be an integer"),
    ("train.compile=1", "train.compile must be true or false"),
    ("data.batch_size=true", "data.batch_size must be an integer"),
], ids=["lr-string", "lr-inf", "eps-nan", "seq-len", "rope-base", "dim-float", "bool", "bool-for-int"])
def test_bad_values_name_the_field(tmp_path, capsys, override, named):
    out = tmp_path / "run"
    assert main(["train", "debug", "--out", str(out), "--set", override]) == 2
    err = _err(capsys)
    assert named in err and "debug.toml" in err, err
    assert not out.exists()


@pytest.mark.parametrize("content,named", [
    (b"model = 3\n", "[model] must be a table, got 3"),
    (b"[optim]\nlr = \"fast\"\n", "optim.lr must be a finite number, got 'fast'"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00\xd0\xff\xfe", "not a UTF-8 text file"),
    (b"[model\n", "invalid TOML"),
], ids=["model-int", "lr-string", "binary", "syntax"])
def test_bad_config_files_name_the_file(tmp_path, capsys, content, named):
    p = tmp_path / "run.toml"
    p.write_bytes(content)
    assert main(["train", str(p), "--out", str(tmp_path / "run")]) == 2
    err = _err(capsys)
    assert named in err and str(p) in err, err


# ---- 5. a checkpoint manifest entry that is not a table --------------------------------------------------
def test_malformed_manifest_entry_is_named(run, capsys):
    newest = list_checkpoints(run / "checkpoints")[-1]
    man = json.loads((newest / "MANIFEST.json").read_text())
    man["files"]["state.pt"] = "abc"
    (newest / "MANIFEST.json").write_text(json.dumps(man))
    lines = []
    s = train(load_config("debug", SETS + ["train.steps=14"]), run, resume=True, log=lines.append)
    assert s["resumed_from"].endswith("step_00000008")  # the newest is skipped, by name
    assert any("step_00000012/MANIFEST.json: entry 'state.pt' must be a table" in x for x in lines)


# ---- a full disk while checkpointing: one line, exit 2, and the run resumes bit for bit ----------------
def test_disk_full_during_a_checkpoint(tmp_path, capsys, monkeypatch):
    from kvshift.train import checkpoint as C
    from kvshift.train.testing import losses

    ref = tmp_path / "ref"
    train(load_config("debug", SETS), ref, log=_quiet)
    run = tmp_path / "run"
    real = C.write_atomic
    calls = {"n": 0}

    def flaky(path, write):
        calls["n"] += 1
        if calls["n"] == 5:  # 4 files per checkpoint: the weights of the second one (step 8)
            raise OSError(28, "No space left on device", str(path))
        real(path, write)

    monkeypatch.setattr(C, "write_atomic", flaky)
    argv = ["train", "debug", "--out", str(run)] + [a for s in SETS for a in ("--set", s)]
    assert main(argv) == 2
    err = _err(capsys)
    assert "No space left on device" in err and "step_00000008.tmp" in err
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000004"]
    monkeypatch.setattr(C, "write_atomic", real)
    assert main(argv + ["--resume"]) == 0
    assert losses(run) == losses(ref)
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_resume_of_a_run_written_before_new_model_fields():
    """A checkpoint's model config without the fields a later version added (mlp, shift_init) means their
    defaults: resuming it is no config change."""
    from kvshift.train.config import load_config
    from kvshift.train.resume import config_changes

    new = load_config("debug")
    d = {**new.to_dict(), "model_config": new.model_config().to_dict()}
    old = json.loads(json.dumps(d))
    for k in ("mlp", "shift_init"):
        old["model_config"].pop(k)
    assert config_changes(old, d, 1, 1) == []
    old["model_config"]["mlp"] = "gelu"
    assert config_changes(old, d, 1, 1) == ["model.mlp 'gelu' -> 'swiglu'"]
