"""train.init_from (start from pretrained weights, any identity-capable attention kind) and
optim.shift_lr_mult (the shift coefficients' own learning rate)."""

import os
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvshift.layers.attention import identity_coefficients
from kvshift.models import LM, ModelConfig
from kvshift.train.config import load_config
from kvshift.train.init import init_from
from kvshift.train.metrics import read_metrics
from kvshift.train.optim import build_optimizer, lr_at, set_lr
from kvshift.train.trainer import EXIT_INTERRUPTED, train


def _quiet(*_):
    pass


def _source(tmp_path, attention="kvshift", identity=True, hf=True):
    """A debug-size LM saved as a model directory (HF key layout "model.<key>" or a bare checkpoint)."""
    lm = LM(ModelConfig.from_name("debug", attention=attention), seed=7)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "shift_" in name:
                p.copy_(identity_coefficients(p.shape[0], p.shape[1] - 1) if identity else torch.rand(p.shape))
    d = tmp_path / f"src-{attention}-{identity}-{hf}"
    d.mkdir()
    pre = "model." if hf else ""
    save_file({pre + k: v.clone().contiguous() for k, v in lm.state_dict().items()}, str(d / "model.safetensors"))
    return lm, d


@pytest.mark.parametrize("attention", ["vanilla", "kvshift", "kshift"])
def test_init_from_reproduces_the_source(tmp_path, attention):
    src, d = _source(tmp_path)
    lm = LM(ModelConfig.from_name("debug", attention=attention), seed=0)
    info = init_from(lm, d)
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        assert torch.allclose(lm.eval()(ids), src.eval()(ids), atol=1e-5)
    assert info["identity_dropped"] == {"vanilla": 4, "kvshift": 0, "kshift": 2}[attention]
    if attention == "kshift":
        assert torch.equal(lm.layers[0].attention.shift_k, identity_coefficients(2, 1))


def test_init_from_fills_identity_and_refuses_what_changes_the_model(tmp_path):
    _, van = _source(tmp_path, "vanilla", hf=False)
    lm = LM(ModelConfig.from_name("debug", attention="kvshift"), seed=0)
    assert init_from(lm, van)["identity_filled"] == 4
    assert torch.equal(lm.layers[1].attention.shift_v, identity_coefficients(2, 1))
    _, moved = _source(tmp_path, identity=False)
    with pytest.raises(ValueError, match="not the identity shift"):
        init_from(LM(ModelConfig.from_name("debug", attention="vanilla")), moved)
    with pytest.raises(ValueError, match="shape"):
        init_from(LM(ModelConfig.from_name("debug", attention="kvshift", vocab_size=98)), moved)
    with pytest.raises(ValueError, match="no such directory"):
        init_from(lm, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no model.safetensors"):
        init_from(lm, tmp_path)
    with pytest.raises(ValueError, match="gate"):
        init_from(LM(ModelConfig.from_name("debug", attention="kvshift_gate")), van)


def test_shift_lr_mult_gives_the_coefficients_their_own_rate():
    lm = LM(ModelConfig.from_name("debug", attention="kvshift"))
    cfg = load_config("debug", ["optim.shift_lr_mult=10"])
    opt = build_optimizer(lm, cfg.optim, torch.device("cpu"))
    set_lr(opt, lr_at(10, cfg.optim, 30))
    shift = [g for g in opt.param_groups if g.get("lr_mult")]
    assert len(shift) == 1 and len(shift[0]["params"]) == 4 and shift[0]["weight_decay"] == 0.0
    assert shift[0]["lr"] == pytest.approx(10 * 3e-3)
    assert all(g["lr"] == pytest.approx(3e-3) for g in opt.param_groups if not g.get("lr_mult"))
    n = sum(len(g["params"]) for g in opt.param_groups)
    assert n == len(list(lm.parameters()))
    plain = build_optimizer(lm, load_config("debug").optim, torch.device("cpu"))
    assert len(plain.param_groups) == 2  # unchanged layout (old checkpoints' optimizer state) at mult 1
    with pytest.raises(ValueError, match="shift_lr_mult"):
        load_config("debug", ["optim.shift_lr_mult=0"])


def test_init_from_run_resumes_exactly(tmp_path):
    _, d = _source(tmp_path)
    sets = ["train.steps=12", "train.ckpt_every=4", "train.eval_every=4", f"train.init_from={str(d)!r}",
            "optim.shift_lr_mult=10", "train.eval_at_start=true"]
    ref = train(load_config("debug", sets), tmp_path / "ref", log=_quiet)
    assert ref["init_from"]["sha256"] and ref["init_from"]["identity_filled"] == 0

    def interrupt(step, rec):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    run = tmp_path / "run"
    s = train(load_config("debug", sets), run, on_step=interrupt, log=_quiet)
    assert s["exit_code"] == EXIT_INTERRUPTED
    s = train(load_config("debug", sets), run, resume=True, log=_quiet)
    assert s["status"] == "finished" and s["init_from"]["restored_from_checkpoint"].endswith("step_00000006")
    a, b = read_metrics(tmp_path / "ref/metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert [r.get("loss") for r in a] == [r.get("loss") for r in b]
    wa = load_file(tmp_path / "ref/checkpoints/step_00000012/model.safetensors")
    wb = load_file(run / "checkpoints/step_00000012/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the pretrained start is not the seed's init: the step-0 validation loss differs from a fresh run's
    fresh = train(load_config("debug", sets[:3] + ["train.eval_at_start=true"]), tmp_path / "fresh", log=_quiet)
    assert read_metrics(tmp_path / "fresh/metrics.jsonl")[0]["val_loss"] != a[0]["val_loss"]
    assert fresh["init_from"] is None
