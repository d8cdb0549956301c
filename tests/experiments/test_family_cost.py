"""The family cost row: each member's training tokens/s and memory over vanilla's, from the bench's e2e part."""

import json

from kvshift.bench.plan import MIXER_ARMS
from kvshift.experiments import cost


def _arm(tok, mem):
    return {"tokens_per_s": tok, "peak_mem_bytes": mem}


def _write(tmp_path, arms, label="bench-162m"):
    (tmp_path / "bench").mkdir(exist_ok=True)
    b = {"meta": {"device": "NVIDIA H200"},
         "e2e": {"models": {label: {"batch": 32, "seq_len": 1024, "layout": "dense", "arms": arms}}}}
    (tmp_path / "bench" / "nvidia-h200.json").write_text(json.dumps(b))


def test_family_row_names_the_members_that_cost_nothing(tmp_path):
    arms = {"vanilla": _arm(1000.0, 100), "fused": _arm(966.0, 100), "dconv": _arm(923.0, 111),
            "canon": _arm(706.0, 145), "keyoffset": _arm(986.0, 104), "smear": _arm(999.0, 100.9)}
    _write(tmp_path, arms)
    [row] = cost.family_rows(tmp_path)
    assert row["verdict"] == "partly reproduced"
    assert "kvshift 0.966 / 1.000" in row["verdict_text"] and "canon 0.706 / 1.450" in row["verdict_text"]
    assert row["verdict_text"].endswith("Negligible (tokens/s ≥ 0.995, memory ≤ 1.01): smear.")
    _write(tmp_path, {a: _arm(1000.0, 100) for a in ("vanilla", "fused", *MIXER_ARMS)})
    assert cost.family_rows(tmp_path)[0]["verdict"] == "reproduced"
    _write(tmp_path, {"vanilla": _arm(1000.0, 100), "fused": _arm(900.0, 100), "canon": _arm(700.0, 150)})
    [row] = cost.family_rows(tmp_path)
    assert row["verdict"] == "not reproduced" and "Not measured: dconv, keyoffset, smear." in row["verdict_text"]
    # every member measured is negligible, but not every member was measured: the claim is about all of them
    _write(tmp_path, {"vanilla": _arm(1000.0, 100), "dconv": _arm(999.0, 100)})
    [row] = cost.family_rows(tmp_path)
    assert row["verdict"] == "inconclusive" and "Not measured: kvshift, canon, keyoffset, smear." in row["verdict_text"]


def test_family_row_without_memory_figures(tmp_path):
    """Off CUDA the bench records no peak memory (None): the row says so instead of failing, and no member counts
    as negligible without it."""
    arms = {a: {"tokens_per_s": 1000.0, "peak_mem_bytes": None} for a in ("vanilla", "fused", *MIXER_ARMS)}
    _write(tmp_path, arms)
    [row] = cost.family_rows(tmp_path)
    assert "kvshift 1.000 / –" in row["verdict_text"] and row["verdict"] == "not reproduced"


def test_a_bench_without_mixer_arms_gives_no_family_row(tmp_path):
    _write(tmp_path, {"vanilla": _arm(1000.0, 100), "fused": _arm(990.0, 100)})
    assert cost.family_rows(tmp_path) == []


def test_family_plan_runs_only_the_e2e_part_of_one_model_with_every_member():
    plan = cost.family_plan("gpu")
    assert plan.parts == ("e2e",) and [m[0] for m in plan.e2e_models] == ["bench-162m"]
    assert plan.e2e_arms == ("vanilla", "fused", *MIXER_ARMS)
