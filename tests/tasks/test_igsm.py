"""iGSM-style problems: independent re-derivation, step-by-step parse check, difficulty knob."""

import random
import re

import pytest
import torch

from kvshift.tasks import igsm
from kvshift.tasks.igsm import Graph, Param


@pytest.mark.parametrize("ops", [1, 2, 5, 12, 15, 21, 24, 25])
def test_exact_problems_check_out(ops):
    for seed in range(25):
        p = igsm.generate(ops, seed=seed, exact=True)
        assert p.n_operations == ops == igsm.count_operations(p.graph)
        assert p.answer == igsm.evaluate(p.graph)
        assert 0 <= p.answer < igsm.MOD
        steps = igsm.check_solution(p)
        assert steps[-1][1] == p.answer
        # every definition is stated once, and the question names the query
        assert p.question_text.count("The number of") == len(p.graph.params)
        assert p.question_text.endswith(f"what is the number of {p.graph.params[p.graph.query].phrase} ?")


def test_at_most_mode_covers_range():
    r = random.Random(0)
    seen = []
    for _ in range(300):
        p = igsm.generate(12, rng=r)
        assert 1 <= p.n_operations <= 12 and p.n_operations == igsm.count_operations(p.graph)
        assert p.answer == igsm.evaluate(p.graph)
        igsm.check_solution(p)
        seen.append(p.n_operations)
    assert set(seen) == set(range(1, 13))


def test_distractors_present_and_unneeded():
    n_unneeded = 0
    for seed in range(30):
        p = igsm.generate(15, seed=seed, exact=True)
        n_unneeded += len(p.graph.params) - len(igsm.check_solution(p))
    assert n_unneeded > 0


def test_evaluator_on_hand_graph():
    P = lambda a, b, op, *ops: Param(a, b, op, tuple(ops))  # noqa: E731
    params = (
        P("Riverview", "studio", "const", ("const", 20)),
        P("studio", "backpack", "const", ("const", 7)),
        P("Oakwood", "lab", "sum", ("param", 0), ("param", 1), ("const", 3)),  # 30 % 23 = 7
        P("lab", "box", "prod", ("param", 2), ("param", 0)),  # 140 % 23 = 2
        P("box", "pencil", "diff", ("param", 1), ("param", 3)),  # 5
        P("box", "ruler", "diff", ("param", 3), ("param", 1)),  # -5 % 23 = 18
    )
    assert igsm.evaluate(Graph(params, 4)) == 5
    assert igsm.evaluate(Graph(params, 5)) == 18
    assert igsm.count_operations(Graph(params, 3)) == 3
    assert igsm.count_operations(Graph(params, 0)) == 0
    cyc = (P("a", "b", "sum", ("param", 1), ("const", 1)), P("b", "c", "sum", ("param", 0), ("const", 1)))
    with pytest.raises(ValueError, match="cycle"):
        igsm.evaluate(Graph(cyc, 0))


def _with_solution(p, text):
    return igsm.Problem(p.question_text, text, p.answer, p.n_operations, p.graph)


def test_checker_rejects_corrupted_solutions():
    p = igsm.generate(8, seed=3, exact=True)
    igsm.check_solution(p)
    steps = p.solution_text.split(" . ")
    # 1) a wrong intermediate result
    op_step = next(i for i, s in enumerate(steps) if s.count("=") == 3)
    head, res = steps[op_step].rsplit(" ", 1)
    bad = steps.copy()
    bad[op_step] = f"{head} {(int(res) + 1) % igsm.MOD}"
    with pytest.raises(igsm.SolutionError):
        igsm.check_solution(_with_solution(p, " . ".join(bad)))
    # 2) dependency order violated: move the step that uses others to the front
    bad = [steps[op_step]] + steps[:op_step] + steps[op_step + 1:]
    with pytest.raises(igsm.SolutionError, match="before defining"):
        igsm.check_solution(_with_solution(p, " . ".join(bad)))
    # 3) a wrong final answer
    bad = re.sub(r"Answer : \d+ \.$", f"Answer : {(p.answer + 1) % igsm.MOD} .", p.solution_text)
    with pytest.raises(igsm.SolutionError):
        igsm.check_solution(_with_solution(p, bad))
    # 4) a needed step dropped
    bad = steps[1:]
    with pytest.raises(igsm.SolutionError):
        igsm.check_solution(_with_solution(p, " . ".join(bad)))


def test_deterministic_and_seed_dependent():
    a, b, c = (igsm.generate(15, seed=s, exact=True) for s in (1, 1, 2))
    assert a == b and a.question_text != c.question_text


def test_tokenizer_roundtrip_and_fixed_vocab():
    tok = igsm.IGSMTokenizer()
    assert tok.itos == igsm.IGSMTokenizer().itos and tok.itos[:4] == ["<pad>", "<bos>", "<sep>", "<eos>"]
    for seed in range(10):
        p = igsm.generate(24, seed=seed, exact=True)
        for text in (p.question_text, p.solution_text):
            assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match="vocabulary"):
        tok.encode("The number of unicorns")


def test_sample_batch_masks_solution_only():
    tok = igsm.IGSMTokenizer()
    tokens, mask = igsm.sample_batch(6, 12, seed=0, tokenizer=tok)
    ref = random.Random(0)
    problems = [igsm.generate(12, rng=ref) for _ in range(6)]
    assert tokens.dtype == torch.int64 and mask.dtype == torch.bool and tokens.shape == mask.shape
    for row, m, p in zip(tokens.tolist(), mask.tolist(), problems):
        n = len(tok.encode(p.question_text))
        L = n + len(tok.encode(p.solution_text)) + 3
        assert row[0] == tok.bos_id and row[n + 1] == tok.sep_id and row[L - 1] == tok.eos_id
        assert all(t == tok.pad_id for t in row[L:])
        scored = [row[q + 1] for q in range(len(row) - 1) if m[q]]
        assert scored == tok.encode(p.solution_text) + [tok.eos_id]
        assert not m[-1]
    t2, m2 = igsm.sample_batch(6, 12, seed=0, tokenizer=tok, seq_len=tokens.shape[1] + 5)
    assert torch.equal(t2[:, : tokens.shape[1]], tokens) and torch.equal(m2[:, : tokens.shape[1]], mask)
    with pytest.raises(ValueError, match="seq_len"):
        igsm.sample_batch(6, 12, seed=0, seq_len=10)


@pytest.mark.parametrize("kw,name", [
    (dict(max_operations=0, seed=0), "max_operations"), (dict(max_operations=26, seed=0), "max_operations"),
    (dict(max_operations=5), "rng"), (dict(max_operations=5, seed=0, rng=random.Random(0)), "rng"),
    (dict(max_operations=5, seed=0, max_distractors=-1), "max_distractors"),
])
def test_argument_validation(kw, name):
    with pytest.raises(ValueError, match=name):
        igsm.generate(**kw)
