"""Theorem 2: one KV-shift layer with one head performs induction exactly; the vanilla layer does not."""

import torch

from kvshift.theory import induction_head, induction_targets, random_embeddings, run_induction_head


def test_theorem2_construction_is_an_exact_induction_head():
    g = torch.Generator().manual_seed(0)
    emb = random_embeddings(64, 256, g)
    tokens = torch.randint(0, 64, (8, 100), generator=g)
    targets = induction_targets(tokens)
    m = targets >= 0
    assert m.sum() > 300
    layer = induction_head(256)
    assert layer.shift_coefficients()[0].tolist() == [[0.0, 1.0]]  # alpha1 = 0, alpha2 = 1
    assert layer.shift_coefficients()[1].tolist() == [[1.0, 0.0]]  # beta1 = 1, beta2 = 0
    pred = run_induction_head(layer, emb, tokens)
    assert torch.equal(pred[m], targets[m])
    vanilla = run_induction_head(induction_head(256, attention="vanilla"), emb, tokens)
    assert (vanilla[m] == targets[m]).float().mean() < 0.2


def test_induction_targets_bruteforce():
    t = torch.tensor([[1, 2, 3, 1, 4, 1, 5]])
    assert induction_targets(t).tolist() == [[-1, -1, -1, 2, -1, 4, -1]]
