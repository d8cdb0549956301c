import pytest

from kvshift.train.config import RunConfig, load_config, shipped_configs


@pytest.mark.parametrize("name", sorted(shipped_configs()), ids=str)
def test_shipped_configs_load(name):
    path = shipped_configs()[name]
    cfg = load_config(path)  # the same code `kvshift train` uses
    mcfg = cfg.model_config()
    assert mcfg.vocab_size > 0 and cfg.train.steps > 0
    assert RunConfig.from_dict(cfg.to_dict()) == cfg  # serialisable round trip
    assert load_config(name) == cfg  # shipped configs are found by name too


def test_shipped_paper_settings():
    cfg = load_config("lm-25m")
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.1 and cfg.optim.schedule == "constant"
    assert (cfg.data.batch_size, cfg.data.seq_len, cfg.train.steps, cfg.optim.warmup) == (64, 1024, 800, 100)
    assert cfg.model_config().dim == 512 and cfg.data.kind == "shards"


@pytest.mark.parametrize("override,bad,valid", [
    ("optim.lrr=1e-3", "lrr", "'lr'"),
    ("train.stepz=3", "stepz", "'steps'"),
    ("data.shard=/x", "shard", "'shard_dir'"),
    ("model.dims=64", "dims", "'dim'"),
    ("trian.steps=3", "trian", "'train'"),
], ids=["optim", "train", "data", "model", "section"])
def test_unknown_key_lists_valid_ones(override, bad, valid):
    with pytest.raises(ValueError) as e:
        load_config("debug", [override])
    assert bad in str(e.value) and valid in str(e.value)


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[optim]\nlr = 1e-3\nwarmpu = 10\n')
    with pytest.raises(ValueError, match=r"warmpu.*valid keys.*warmup"):
        load_config(p)


def test_set_coerces_types():
    cfg = load_config("debug", ["optim.lr=1", "model.attention=vanilla", "train.compile=true",
                                "optim.betas=[0.8, 0.99]", "data.kind=shards", "data.shard_dir=2024",
                                "train.steps=7", "model.shift_window=2"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0
    assert cfg.model_config().attention == "vanilla" and cfg.model_config().shift_window == 2
    assert cfg.train.compile is True and cfg.train.steps == 7
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.data.shard_dir == "2024"


@pytest.mark.parametrize("override,match", [
    ("optim.schedule=linear", "optim.schedule"),
    ("train.steps=0", "train.steps"),
    ("train.dtype=fp16", "train.dtype"),
    ("model.attention=nope", "attention"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("data.kind=shards", "shard_dir"),
    ("steps=3", "section.key=value"),
], ids=["schedule", "steps", "dtype", "attention", "betas", "shard_dir", "no-section"])
def test_bad_values(override, match):
    with pytest.raises(ValueError, match=match):
        load_config("debug", [override])


def test_missing_config_file():
    with pytest.raises(ValueError, match="not found"):
        load_config("/nonexistent/run.toml")
