"""The model options beside the attention kind: learned absolute positions, the GELU MLP and the
"half" shift init (the exactness of cached, padded and packed runs with them is in test_lm.py)."""

import math

import pytest
import torch

from kvshift import LM, ModelConfig
from kvshift.layers.attention import paper_init
from kvshift.layers.mlp import GeluMLP, SwiGLU
from kvshift.models.lm import SHIFT_SEED_OFFSET


def learned(**kw):
    return LM(ModelConfig.from_name("debug", position="learned", **kw), seed=0).eval()


# ---- position="learned" ----------------------------------------------------------------------------
def test_learned_positions_are_an_embedding_added_before_the_first_block():
    m = learned()
    cfg = m.config
    assert m.pos_embeddings.weight.shape == (cfg.max_seq_len, cfg.dim)
    assert not hasattr(m, "rope_cos")
    std = m.pos_embeddings.weight.std().item()
    assert abs(std / cfg.init_std - 1) < 0.05  # normal(0, init_std) like the token embedding
    x = torch.randint(0, 97, (2, 9))
    seen = []
    h = m.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        m(x)
    h.remove()
    torch.testing.assert_close(seen[0], m.tok_embeddings(x) + m.pos_embeddings.weight[:9], rtol=0, atol=0)


def test_learned_positions_change_the_output():
    """The positions are used: the same tokens at other positions give other logits, and zeroed
    position embeddings give the position-free model's logits."""
    m = learned()
    x = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        a = m(x)
        b = m(x, position_ids=torch.arange(8).view(1, 8) + 5)
        assert (a - b).abs().max() > 1e-3
        none = LM(ModelConfig.from_name("debug", position="none"), seed=0).eval()
        none.load_state_dict({k: v for k, v in m.state_dict().items() if k != "pos_embeddings.weight"})
        m.pos_embeddings.weight.zero_()
        torch.testing.assert_close(m(x), none(x), rtol=0, atol=0)


def test_learned_positions_beyond_max_seq_len_are_refused():
    m = learned(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        m(torch.randint(0, 97, (1, 17)))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        m(torch.randint(0, 97, (1, 4)), position_ids=torch.tensor([[0, 1, 16, 17]]))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        m(torch.randint(0, 97, (1, 4)), position_ids=torch.tensor([[0, 1, -1, 2]]))
    with pytest.raises(ValueError, match="max_seq_len=16"):  # one packed document of 17 tokens
        m(torch.randint(0, 97, (1, 20)), cu_seqlens=torch.tensor([0, 3, 20], dtype=torch.int32))
    # a cache longer than the table: decoding stops with the error at position 16
    cache = m.new_cache(1, 24)
    m(torch.randint(0, 97, (1, 15)), cache=cache)
    m(torch.randint(0, 97, (1, 1)), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        m(torch.randint(0, 97, (1, 1)), cache=cache)
    # fine: a packed row longer than max_seq_len whose documents are shorter; left pads before 16 tokens
    assert m(torch.randint(0, 97, (1, 30)), cu_seqlens=torch.tensor([0, 16, 30], dtype=torch.int32)).shape == (1, 30, 97)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 16, dtype=torch.long)], 1)
    ids = torch.randint(0, 97, (1, 20))
    torch.testing.assert_close(m(ids, attention_mask=mask)[:, 4:], m(ids[:, 4:]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        m.generate(torch.randint(0, 97, (1, 10)), 10, temperature=0)


def test_learned_positions_count_with_the_embeddings():
    cfg = ModelConfig.from_name("debug", position="learned")
    m = LM(cfg, seed=0)
    assert cfg.non_embedding_params() == ModelConfig.from_name("debug").non_embedding_params()
    assert m.num_params() == cfg.non_embedding_params()
    assert m.num_params(non_embedding=False) == (cfg.non_embedding_params() + cfg.max_seq_len * cfg.dim
                                                 + 2 * cfg.vocab_size * cfg.dim)
    decayed = {id(p) for p in m.param_groups(0.1)[0]["params"]}
    assert id(m.pos_embeddings.weight) in decayed  # a matrix, decayed like the token embedding


# ---- mlp="gelu" ------------------------------------------------------------------------------------
def test_gelu_mlp_is_gpt2s_without_biases():
    cfg = ModelConfig.from_name("debug", mlp="gelu")
    m = LM(cfg, seed=0)
    ff = m.layers[0].feed_forward
    assert isinstance(ff, GeluMLP) and isinstance(LM(ModelConfig.from_name("debug"), seed=0).layers[0].feed_forward,
                                                  SwiGLU)
    assert [n for n, _ in ff.named_parameters()] == ["w1.weight", "w2.weight"]
    assert ff.w1.weight.shape == (cfg.ffn_dim, cfg.dim) and ff.w2.weight.shape == (cfg.dim, cfg.ffn_dim)
    x = torch.randn(3, cfg.dim)
    u = x @ ff.w1.weight.T
    gelu_tanh = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
    torch.testing.assert_close(ff(x), gelu_tanh @ ff.w2.weight.T, rtol=1e-5, atol=1e-6)
    # the output projection is a residual output: scaled like attention's wo
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    assert abs(ff.w2.weight.std().item() / out_std - 1) < 0.1


def test_gelu_mlp_sizes_and_default_width():
    assert ModelConfig(dim=64, mlp="gelu").ffn_dim == 256
    assert ModelConfig(dim=64).ffn_dim == 192  # Llama's 8/3·dim rounded to 64, unchanged
    assert ModelConfig(dim=64, mlp="gelu", ffn_dim=100).ffn_dim == 100
    sw, ge = ModelConfig.from_name("debug"), ModelConfig.from_name("debug", mlp="gelu")
    assert sw.non_embedding_params() - ge.non_embedding_params() == sw.n_layers * sw.dim * sw.ffn_dim
    assert LM(ge, seed=0).num_params() == ge.non_embedding_params()


# ---- shift_init -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kvshift", "kvshift_gate", "kvshift_clamp", "kshift", "vshift"])
@pytest.mark.parametrize("window", [1, 2, 3], ids=["w1", "w2", "w3"])
def test_half_init_gives_equal_taps(kind, window):
    m = LM(ModelConfig.from_name("debug", attention=kind, shift_window=window, shift_init="half"), seed=4)
    half = torch.full((2, window + 1), 1 / (window + 1))
    for layer in m.layers:
        alpha, beta = layer.attention.shift_coefficients()
        for c in {"kshift": [alpha], "vshift": [beta]}.get(kind, [alpha, beta]):  # the shifted sides
            torch.testing.assert_close(c, half, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("window", [1, 2])
def test_uniform_init_is_the_paper_draw_from_its_own_stream(window):
    """shift_init="uniform" (the default) keeps the earlier init bit for bit: per layer, k then v, each
    paper_init from one generator seeded seed + SHIFT_SEED_OFFSET."""
    m = LM(ModelConfig.from_name("debug", shift_window=window), seed=7)
    assert m.config.shift_init == "uniform"
    g = torch.Generator().manual_seed(7 + SHIFT_SEED_OFFSET)
    for layer in m.layers:
        for p in (layer.attention.shift_k, layer.attention.shift_v):
            assert torch.equal(p.detach(), paper_init(2, window, g))
