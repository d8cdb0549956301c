"""Masked GQA attention without a per-head copy of the cache (kvshift.layers.gqa): in a masked GQA decode step
(one query token per row: the steps after a left-padded prompt, any step under ALiBi's bias) K/V go to SDPA as
they are with enable_gqa where SDPA's dispatcher picks cuDNN for it; elsewhere (prefills, training, other
kernels) they are repeated per query head. Both layouts give the same logits (fp32), the dispatcher is asked
once per call signature and SDPA state, and its answer is the layer's (on a GPU)."""

import pytest
import torch

import kvshift.layers.gqa as gqa
from kvshift import LM, ModelConfig

TOL = 1e-5  # fp32 max |Δlogit| between the two layouts


def make(kind, position, n_kv_heads=2, **kw):
    cfg = ModelConfig.from_name("debug", attention=kind, shift_window=2, position=position, n_kv_heads=n_kv_heads,
                                **kw)
    return LM(cfg, seed=0).eval()


def padded(lengths, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (len(lengths), T), generator=g)
    mask = (torch.arange(T) >= torch.tensor([[T - n] for n in lengths])).long()
    return ids * mask, mask


def prefill_and_decode(model, steps=4, device="cpu", dtype=torch.float32):
    """Logits of a left-padded prefill and `steps` cached decode steps, (B, 1 + steps, V) fp32."""
    ids, mask = padded([9, 4, 1], 9)
    cache = model.new_cache(3, 9 + steps, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        out = [model(ids.to(device), cache=cache, attention_mask=mask.to(device))[:, -1:]]
        for _ in range(steps):
            out.append(model(torch.randint(1, 97, (3, 1), generator=g).to(device), cache=cache))
    return torch.cat(out, 1).float()


@pytest.mark.parametrize("kind, position", [("vanilla", "rope"), ("kvshift", "rope"), ("kvshift", "alibi"),
                                            ("vshift", "learned")])
def test_native_layout_equals_repeated_heads(monkeypatch, kind, position):
    """With the dispatcher's answer forced to yes on a CPU, every decode step takes enable_gqa (counted at SDPA)
    and the padded prefill does not; the logits equal the repeated layout's; asked once, for the one-token step,
    whatever its growing key length."""
    model = make(kind, position)
    want = prefill_and_decode(model)
    asked, native = [], []
    monkeypatch.setattr(gqa, "NATIVE_DEVICES", ("cpu",))
    monkeypatch.setattr(gqa, "_CHOICES", {})
    monkeypatch.setattr(gqa, "cudnn_picked", lambda q, k, mask: asked.append(q.shape[2]) or True)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        native.append((q.shape[2], kw.get("enable_gqa", False) and k.shape[1] < q.shape[1]))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    got = prefill_and_decode(model)
    assert (got - want).abs().max().item() <= TOL
    assert asked == [1]
    layers = model.config.n_layers
    assert native == [(9, False)] * layers + [(1, True)] * 4 * layers


def test_no_native_layout_where_it_does_not_apply(monkeypatch):
    """Not asked for an MHA model, under autograd, or off the devices it applies to (a CPU by default)."""
    monkeypatch.setattr(gqa, "_CHOICES", {})
    monkeypatch.setattr(gqa, "cudnn_picked", lambda q, k, mask: pytest.fail("asked"))
    prefill_and_decode(make("kvshift", "rope"))  # a CPU
    monkeypatch.setattr(gqa, "NATIVE_DEVICES", ("cpu",))
    prefill_and_decode(make("kvshift", "rope", n_kv_heads=4))  # MHA: nothing to repeat
    q, k = torch.zeros(2, 4, 1, 8, requires_grad=True), torch.zeros(2, 2, 5, 8)
    assert not gqa.masked_gqa_native(q, k, torch.ones(2, 1, 1, 5, dtype=torch.bool))


def test_the_signature_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(gqa, "NATIVE_DEVICES", ("cpu",))
    monkeypatch.setattr(gqa, "_CHOICES", {})
    monkeypatch.setattr(gqa, "_MAX_CHOICES", 4)
    monkeypatch.setattr(gqa, "cudnn_picked", lambda q, k, mask: True)
    k = torch.zeros(1, 2, 5, 8)
    for b in range(1, 11):
        assert gqa.masked_gqa_native(torch.zeros(b, 4, 1, 8), k.expand(b, -1, -1, -1),
                                     torch.ones(b, 1, 1, 5, dtype=torch.bool))
        assert len(gqa._CHOICES) <= 4


def test_the_answer_is_asked_again_when_sdpa_state_changes(monkeypatch):
    """A remembered answer belongs to SDPA's backend flags and determinism setting (an sdpa_kernel context that
    leaves cuDNN out must not reuse a yes given outside it); a key of length 1 is asked but never remembered."""
    monkeypatch.setattr(gqa, "NATIVE_DEVICES", ("cpu",))
    monkeypatch.setattr(gqa, "_CHOICES", {})
    asked = []
    monkeypatch.setattr(gqa, "cudnn_picked", lambda q, k, mask: asked.append(k.shape[2]) or True)
    q, mask = torch.zeros(2, 4, 1, 8), torch.ones(2, 1, 1, 5, dtype=torch.bool)
    k = torch.zeros(2, 2, 5, 8)
    gqa.masked_gqa_native(q, k, mask)
    gqa.masked_gqa_native(q, k, mask)
    assert len(asked) == 1
    flag = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(not flag)
        gqa.masked_gqa_native(q, k, mask)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(flag)
    assert len(asked) == 2
    det = torch.are_deterministic_algorithms_enabled()  # whatever an earlier test left it at: flip it
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: not det)
    gqa.masked_gqa_native(q, k, mask)
    assert len(asked) == 3
    gqa._CHOICES.clear()
    one = torch.zeros(2, 2, 1, 8)
    for _ in range(2):
        gqa.masked_gqa_native(q, one, mask[..., :1])
    assert asked[-2:] == [1, 1] and not gqa._CHOICES


def test_not_while_torch_compile_traces(monkeypatch):
    """Under torch.compile (transformers' compiled static-cache decode goes through the layer with one query
    token and a mask) the dispatcher is not asked and the layout is the repeated one."""
    monkeypatch.setattr(gqa, "NATIVE_DEVICES", ("cpu",))
    monkeypatch.setattr(gqa, "_CHOICES", {})
    monkeypatch.setattr(gqa, "cudnn_picked", lambda q, k, mask: True)
    q, k, mask = torch.zeros(2, 4, 1, 8), torch.zeros(2, 2, 5, 8), torch.ones(2, 1, 1, 5, dtype=torch.bool)
    assert gqa.masked_gqa_native(q, k, mask)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(gqa, "_CHOICES", {})
    assert not gqa.masked_gqa_native(q, k, mask)
    assert not gqa._CHOICES


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SDPA's dispatcher choice on a GPU")
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_on_a_gpu_the_layout_is_the_dispatchers_choice_and_logits_agree(monkeypatch, position):
    """bf16 on CUDA at head dim 64: the layer's answer is `torch._fused_sdp_choice`'s for the decode call (cuDNN
    on a Hopper GPU, where it was measured), and the two layouts' logits agree to bf16 rounding over a padded
    prefill and four decode steps."""
    from torch.nn.attention import SDPBackend

    q = torch.zeros(3, 4, 1, 64, dtype=torch.bfloat16, device="cuda")
    k = torch.zeros(3, 2, 13, 64, dtype=torch.bfloat16, device="cuda")
    mask = torch.ones(3, 1, 1, 13, dtype=torch.bool, device="cuda")
    choice = torch._fused_sdp_choice(q, k, k, mask, 0.0, False, enable_gqa=True)
    monkeypatch.setattr(gqa, "_CHOICES", {})
    with torch.no_grad():
        assert gqa.masked_gqa_native(q, k, mask) == (choice == int(SDPBackend.CUDNN_ATTENTION))
    if torch.cuda.get_device_capability()[0] == 9:
        assert choice == int(SDPBackend.CUDNN_ATTENTION)
    model = make("kvshift", position, dim=256).to("cuda", torch.bfloat16)
    outs = []
    for force in (False, True):
        monkeypatch.setattr(gqa, "_CHOICES", {})
        monkeypatch.setattr(gqa, "cudnn_picked", lambda q, k, mask, force=force: force)
        outs.append(prefill_and_decode(model, device="cuda", dtype=torch.bfloat16))
    assert (outs[0] - outs[1]).abs().max().item() <= 0.05 * outs[0].abs().max().item()
