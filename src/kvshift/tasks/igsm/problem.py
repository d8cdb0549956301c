"""The iGSM problem's structure and meaning: parameters, their dependency graph, arithmetic mod 23, and
the values and operation count the question needs (see kvshift.tasks.igsm)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["MOD", "MAX_OPERATIONS", "SYMBOLS", "Param", "Graph", "Problem", "needed", "count_operations", "apply_op",
           "evaluate_all", "evaluate"]

MOD = 23
MAX_OPERATIONS = 25
SYMBOLS = {"sum": "+", "prod": "*", "diff": "-"}  # how the solution text writes each operation


@dataclass(frozen=True)
class Param:
    """One instance parameter: the number of ``child`` in each ``parent``.

    op is "const", "sum", "prod" or "diff"; operands are ("param", index) or ("const", value)
    (a const parameter has the single operand ("const", value)).
    """

    parent: str
    child: str
    op: str
    operands: tuple[tuple[str, int], ...]

    @property
    def phrase(self) -> str:
        return f"each {self.parent} 's {self.child}"


@dataclass(frozen=True)
class Graph:
    params: tuple[Param, ...]
    query: int


@dataclass(frozen=True)
class Problem:
    question_text: str
    solution_text: str
    answer: int
    n_operations: int
    graph: Graph


def needed(graph: Graph) -> set[int]:
    """The query and all its ancestors."""
    seen, stack = set(), [graph.query]
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        stack.extend(v for kind, v in graph.params[i].operands if kind == "param")
    return seen


def count_operations(graph: Graph) -> int:
    """Arithmetic operations needed to compute the query: sum of (operands - 1) over its ancestors."""
    return sum(len(graph.params[i].operands) - 1 for i in needed(graph) if graph.params[i].op != "const")


def apply_op(op: str, vals: list[int]) -> int:
    """The operation on the operand values, mod MOD."""
    if op == "sum":
        return sum(vals) % MOD
    if op == "prod":
        out = 1
        for v in vals:
            out = out * v % MOD
        return out
    if op == "diff":
        return (vals[0] - vals[1]) % MOD
    raise ValueError(f"unknown op {op!r}")


def evaluate_all(graph: Graph) -> dict[int, int]:
    """Values of every parameter by Kahn's topological order (independent of the generator)."""
    P = len(graph.params)
    deps = [{v for kind, v in p.operands if kind == "param"} for p in graph.params]
    users: list[list[int]] = [[] for _ in range(P)]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    indeg = [len(d) for d in deps]
    ready = deque(i for i in range(P) if indeg[i] == 0)
    vals: dict[int, int] = {}
    while ready:
        i = ready.popleft()
        p = graph.params[i]
        operand_vals = [v if kind == "const" else vals[v] for kind, v in p.operands]
        vals[i] = operand_vals[0] % MOD if p.op == "const" else apply_op(p.op, operand_vals)
        for u in users[i]:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    if len(vals) != P:
        raise ValueError("graph has a dependency cycle")
    return vals


def evaluate(graph: Graph) -> int:
    """The query's value, re-derived from the definitions alone."""
    return evaluate_all(graph)[graph.query]
