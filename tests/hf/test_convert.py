"""`kvshift export` (training checkpoints) and `kvshift convert-llama` (identity shift: same logits)."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kvshift.cli import main
from kvshift.hf import KVShiftForCausalLM, load_training_checkpoint


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def _write_tokenizer_json(tokenizer, path):
    tokenizer.backend_tokenizer.save(str(path))
    return path


def test_export_run_directory(lm_factory, tokenizer, tmp_path):
    from kvshift.train.checkpoint import save_checkpoint

    lm = lm_factory(seed=7, vocab_size=len(tokenizer), tie_embeddings=False)
    run = tmp_path / "run"
    run.mkdir()
    tok_file = _write_tokenizer_json(tokenizer, tmp_path / "tokenizer.json")
    (run / "config.json").write_text(json.dumps({"data": {"tokenizer": str(tok_file)},
                                                 "model_config": lm.config.to_dict()}))
    save_checkpoint(run / "checkpoints", 10, {k: torch.zeros_like(v) for k, v in lm.state_dict().items()}, {"note": 1})
    save_checkpoint(run / "checkpoints", 20, lm.state_dict(), {"note": 2})  # the newest one is exported
    dst = tmp_path / "hf"
    assert main(["export", str(run), str(dst)]) == 0
    model = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert isinstance(model, KVShiftForCausalLM)
    x = torch.randint(0, lm.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    assert (_logits(model, x) - _logits(lm, x)).abs().max().item() <= 1e-6
    tok = AutoTokenizer.from_pretrained(dst)
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    ids = tok("hello world").input_ids  # <|endoftext|> first, as before every training document
    assert ids[0] == 0 and tok.decode(ids, skip_special_tokens=True) == "hello world"
    assert tok("hello world", add_special_tokens=False).input_ids == ids[1:]
    assert model.generation_config.eos_token_id == tok.eos_token_id == 0
    assert json.loads((dst / "kvshift_export.json").read_text())["step"] == 20


@pytest.mark.parametrize("options", [dict(attention="kvshift_gate"),
                                     dict(position="learned", mlp="gelu", shift_init="half")],
                         ids=["gate", "learned-gelu-half"])
def test_export_checkpoint_dir_with_model_config_json(options, lm_factory, tmp_path):
    lm = lm_factory(seed=8, tie_embeddings=True, **options)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    sd = {k: v.contiguous() for k, v in lm.state_dict().items() if k != "output.weight"}  # tied head omitted
    save_file({"_orig_mod." + k: v for k, v in sd.items()}, ckpt / "model.safetensors")  # saved from a compiled model
    (ckpt / "model_config.json").write_text(json.dumps(lm.config.to_dict()))
    dst = tmp_path / "hf"
    assert main(["export", str(ckpt), str(dst)]) == 0
    model = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert model.config.to_model_config() == lm.config
    x = torch.randint(0, 97, (1, 11))
    assert (_logits(model, x) - _logits(lm, x)).abs().max().item() <= 1e-6


def test_export_errors_are_clear(lm_factory, tmp_path, capsys):
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    lm = lm_factory()
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="no model config"):
        load_training_checkpoint(tmp_path)
    (tmp_path / "model_config.json").write_text(json.dumps(lm.config.replace(n_layers=3).to_dict()))
    with pytest.raises(ValueError, match="missing"):
        from kvshift.hf import export_checkpoint
        export_checkpoint(tmp_path, tmp_path / "out")


def _tiny_llama(tmp_path, **kw):
    cfg = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rope_theta=5000.0, max_position_embeddings=128, initializer_range=0.2,
               rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    cfg.update(kw)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    src = tmp_path / "llama"
    model.save_pretrained(src)
    return model, src


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_convert_llama_keeps_logits(tie, tmp_path):
    llama, src = _tiny_llama(tmp_path, tie_word_embeddings=tie)
    dst = tmp_path / "kv"
    assert main(["convert-llama", str(src), str(dst)]) == 0
    model = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert isinstance(model, KVShiftForCausalLM)
    assert model.config.rope_base == 5000.0 and model.config.n_kv_heads == 2 and model.config.attention == "kvshift"
    for layer in model.model.layers:  # identity shift: alpha1 = beta1 = 1, alpha2 = beta2 = 0
        assert torch.equal(layer.attention.shift_k, torch.tensor([[1.0, 0.0]] * 2))
        assert torch.equal(layer.attention.shift_v, torch.tensor([[1.0, 0.0]] * 2))
    x = torch.randint(0, 101, (2, 23), generator=torch.Generator().manual_seed(1))
    ref = _logits(llama, x)
    assert ref.abs().max() > 1.0  # a large init, so a wrong RoPE convention or mapping shows
    assert (_logits(model, x) - ref).abs().max().item() <= 1e-4
    greedy = model.generate(x[:1, :5], max_new_tokens=8, do_sample=False)
    assert torch.equal(greedy, llama.generate(x[:1, :5], max_new_tokens=8, do_sample=False))


UNSUPPORTED = {
    "rope_scaling": (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope"),
    "attention_bias": (dict(attention_bias=True), "attention_bias"),
    "mlp_bias": (dict(mlp_bias=True), "mlp_bias"),
    "head_dim": (dict(head_dim=32), "head_dim"),
    "hidden_act": (dict(hidden_act="gelu"), "hidden_act"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED), ids=list(UNSUPPORTED))
def test_convert_llama_refuses_unsupported(case, tmp_path, capsys):
    _, src = _tiny_llama(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    change, word = UNSUPPORTED[case]
    if case == "rope_scaling" and "rope_parameters" in cfg:  # transformers 5.x layout
        cfg["rope_parameters"] = {**cfg["rope_parameters"], **change["rope_scaling"]}
    else:
        cfg.update(change)
    (src / "config.json").write_text(json.dumps(cfg))
    assert main(["convert-llama", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "unsupported Llama features" in err and word in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_export_real_training_run_and_standalone_checkpoint(tmp_path, capsys):
    """End to end with the trainer's own format: a few steps of the debug config, then export the
    run directory and a copy of one checkpoint directory taken out of its run."""
    import shutil

    from safetensors.torch import load_file

    from kvshift import LM, ModelConfig

    run = tmp_path / "run"
    rc = main(["train", "debug", "--out", str(run), "--set", "train.steps=2", "--set", "train.ckpt_every=2",
               "--set", "train.eval_every=2"])
    assert rc == 0
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    lm = LM(ModelConfig.from_dict(json.loads((run / "config.json").read_text())["model_config"]), seed=None)
    lm.load_state_dict(load_file(ckpt / "model.safetensors"))
    lone = tmp_path / "lone_ckpt"
    shutil.copytree(ckpt, lone)
    x = torch.randint(0, lm.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    for src in (run, lone):
        dst = tmp_path / f"hf_{src.name}"
        assert main(["export", str(src), str(dst)]) == 0
        model = AutoModelForCausalLM.from_pretrained(dst).eval()
        assert (_logits(model, x) - _logits(lm.eval(), x)).abs().max().item() <= 1e-6
