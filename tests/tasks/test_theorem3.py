"""Theorem 3 loss (paper Sec. 3.1 / App. C): hand values, gradients, minimiser and O(T) flattening."""

import math

import pytest
import torch

from kvshift.tasks import theorem3


def hand_loss(a1_, a2_, b1, b2, ot):
    S = math.exp(a2_) + 2 * math.exp(a1_) + ot
    a1, a2 = math.exp(a1_) / S, math.exp(a2_) / S
    num = math.exp(a2 * b1 + b2 / S)
    den = num + 2 * math.exp(b1 / S + b2 * a2) + math.exp(2 * a1 * b1 + a2 * b2) + ot
    return -math.log(num / den)


@pytest.mark.parametrize("pt", [(0, 1, 1, 0, 0), (1, 0, 0, 1, 0), (0.5, 0.5, 0.5, 0.5, 0), (0.3, 0.9, -0.2, 1.4, 10),
                                (0, 1, 1, 0, 100)], ids=["induction", "anti", "mid", "off-simplex", "OT100"])
def test_known_points(pt):
    assert float(theorem3.loss(*pt)) == pytest.approx(hand_loss(*pt), rel=1e-6)


def test_literal_values():
    # worked by hand: S = e + 2, a2 = e/S, L = -log(e^{a2} / (e^{a2} + 2 e^{1/S} + e^{2/S}))
    assert float(theorem3.loss(0.0, 1.0, 1.0, 0.0)) == pytest.approx(1.17808, abs=1e-4)
    assert float(theorem3.loss(1.0, 0.0, 0.0, 1.0)) == pytest.approx(math.log(4), abs=1e-6)  # all terms equal


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    args = [torch.rand(5, generator=g, dtype=torch.float64).requires_grad_() for _ in range(4)]
    ot = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(theorem3.loss, (*args, ot))


def test_broadcasting():
    a = torch.linspace(0, 1, 3).view(3, 1)
    b = torch.linspace(0, 1, 4).view(1, 4)
    assert theorem3.loss(a, 1 - a, b, 1 - b).shape == (3, 4)


def test_induction_solution_is_lowest():
    L = lambda a1, b1: float(theorem3.loss(a1, 1 - a1, b1, 1 - b1, 0.0))  # noqa: E731
    assert L(0, 1) < L(1, 0) and L(0, 1) < L(0.5, 0.5)
    a1, b1, Lg, _, _ = theorem3.landscape_grid(41, OT=0.0)
    k = int(Lg.argmin())
    assert float(a1.flatten()[k]) == 0.0 and float(b1.flatten()[k]) == 1.0


def test_grid_layout_and_constrained_gradient():
    n = 21
    a1, b1, L, ga, gb = theorem3.landscape_grid(n, OT=10.0)
    assert a1.shape == b1.shape == L.shape == ga.shape == gb.shape == (n, n)
    assert torch.equal(a1[0], torch.linspace(0, 1, n, dtype=torch.float64))
    assert torch.equal(b1[:, 0], torch.linspace(0, 1, n, dtype=torch.float64))
    # total derivative along the constraint (α2 = 1 − α1, β2 = 1 − β1) by central differences
    i, j, h = 7, 13, 1e-6
    x, y = float(a1[i, j]), float(b1[i, j])
    f = lambda x, y: hand_loss(x, 1 - x, y, 1 - y, 10.0)  # noqa: E731
    assert float(ga[i, j]) == pytest.approx((f(x + h, y) - f(x - h, y)) / (2 * h), rel=1e-5)
    assert float(gb[i, j]) == pytest.approx((f(x, y + h) - f(x, y - h)) / (2 * h), rel=1e-5)


def test_larger_OT_flattens():
    norms = []
    for ot in (0.0, 10.0, 100.0):
        _, _, _, ga, gb = theorem3.landscape_grid(31, OT=ot)
        norms.append(float(torch.sqrt(ga**2 + gb**2).mean()))
    assert norms[0] > norms[1] > norms[2]
    assert norms[2] < 0.1 * norms[0]


def test_argument_validation():
    with pytest.raises(ValueError, match="OT"):
        theorem3.loss(0.0, 1.0, 1.0, 0.0, -1.0)
    with pytest.raises(ValueError, match="n"):
        theorem3.landscape_grid(1)
