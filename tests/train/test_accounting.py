import pytest

from kvshift.models import ModelConfig
from kvshift.train.flops import flops_per_token, mfu, peak_flops_for
from kvshift.train.optim import lr_at
from kvshift.train.config import OptimConfig


def test_flops_per_token_formula():
    c = ModelConfig.from_name("lm-25m")  # d 512, 8 layers, MHA, ffn 1408, vocab 16384
    n = 8 * (4 * 512 * 512 + 3 * 512 * 1408 + 2 * 512 + 2 * 8 * 2) + 512
    assert c.non_embedding_params() == n
    assert flops_per_token(c, 1024) == 6 * n + 6 * 16384 * 512 + 12 * 8 * 1024 * 512
    # 1M tokens/s on one H100-class device ~ 26% MFU for this model
    assert mfu(1e6, c, 1024, 989e12) == pytest.approx(flops_per_token(c, 1024) * 1e6 / 989e12)
    assert 0.2 < mfu(1e6, c, 1024, 989e12) < 0.3
    assert peak_flops_for("NVIDIA H200") == 989e12 and peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12


def test_schedule():
    c = OptimConfig(lr=1e-3, warmup=10, schedule="constant")
    assert [lr_at(s, c, 100) for s in (0, 4, 9, 10, 99)] == pytest.approx([1e-4, 5e-4, 1e-3, 1e-3, 1e-3])
    c = OptimConfig(lr=1e-3, warmup=10, schedule="cosine", min_lr=1e-4)
    assert lr_at(10, c, 110) == pytest.approx(1e-3)
    assert lr_at(60, c, 110) == pytest.approx(5.5e-4)
    assert lr_at(110, c, 110) == pytest.approx(1e-4)


def test_weight_decay_groups():
    import torch

    from kvshift.models import LM
    from kvshift.train.optim import build_optimizer

    m = LM(ModelConfig.from_name("debug", attention="kvshift"))
    opt = build_optimizer(m, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    names = {id(p): n for n, p in m.named_parameters()}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    nodecay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decay | nodecay == set(names.values()) and not decay & nodecay
    assert "tok_embeddings.weight" in decay and "output.weight" in decay and "layers.0.attention.wq.weight" in decay
    assert all("norm" in n or "shift" in n for n in nodecay)
    assert any("shift" in n for n in nodecay) and "norm.weight" in nodecay
    assert opt.defaults["betas"] == (0.9, 0.95)
