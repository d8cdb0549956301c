"""Generating iGSM problems: a random dependency graph with an exact operation count, distractors,
entity names, the shuffled statement and the step-by-step solution (see kvshift.tasks.igsm)."""

from __future__ import annotations

import random
import string

from kvshift.tasks.common import check_int
from kvshift.tasks.igsm.problem import (MAX_OPERATIONS, MOD, SYMBOLS, Graph, Param, Problem, apply_op, count_operations,
                                        needed)

__all__ = ["FAMILIES", "VARIABLES", "TEMPLATE_WORDS", "generate", "rng_from"]

VARIABLES = tuple(string.ascii_lowercase + string.ascii_uppercase)  # the solution's variable names

FAMILIES = (
    (
        ("Riverview", "Oakwood", "Hillcrest", "Lakeside", "Maplewood", "Brookfield", "Fairview", "Westwood"),
        ("studio", "lab", "library", "gym", "cafeteria", "classroom", "office", "auditorium"),
        ("backpack", "locker", "cabinet", "shelf", "drawer", "crate", "box", "basket"),
        ("pencil", "notebook", "ruler", "eraser", "marker", "stapler", "crayon", "folder"),
    ),
    (
        ("Sunnyvale", "Pinecrest", "Northgate", "Silverlake", "Redwood", "Elmhurst", "Greenfield", "Stonebridge"),
        ("aviary", "pond", "cage", "paddock", "burrow", "den", "pen", "barn"),
        ("parrot", "turtle", "rabbit", "goat", "fox", "owl", "duck", "lamb"),
        ("toy", "blanket", "bell", "collar", "ribbon", "brush", "bucket", "carrot"),
    ),
)
# every other word the statement and solution use
TEMPLATE_WORDS = (
    "The number of each 's equals the sum of and , times minus . Question : what is ? "
    "Define as ; so = + * - Answer"
).split()


def _build_needed(n_ops: int, rng: random.Random) -> list[dict]:
    """Top-down DAG with exactly n_ops operations, every node an ancestor of node 0 (the query).

    A node being expanded may reference new nodes or other still-unexpanded leaves; an edge always
    points to a node with no outgoing edges at that moment, so no cycle can form (the last edge
    added on a cycle would point to a node that later gained an outgoing edge).
    """
    nodes: list[dict] = [{"op": None, "operands": []}]
    frontier = [0]
    budget = n_ops
    while budget > 0:
        v = rng.choice(frontier)
        frontier.remove(v)
        op = rng.choices(("sum", "prod", "diff"), weights=(2, 1, 1))[0]
        arity = 3 if (op == "sum" and budget >= 2 and rng.random() < 0.5) else 2
        const_slot = rng.randrange(arity) if rng.random() < 0.25 else -1
        operands: list[tuple[str, int]] = []
        for s in range(arity):
            if s == const_slot:
                operands.append(("const", rng.randrange(MOD)))
                continue
            reusable = [u for u in frontier if ("param", u) not in operands]
            must_grow = not frontier and not any(k == "param" for k, _ in operands) and s == arity - 1
            if reusable and not must_grow and rng.random() < 0.5:
                operands.append(("param", rng.choice(reusable)))
            else:
                nodes.append({"op": None, "operands": []})
                frontier.append(len(nodes) - 1)
                operands.append(("param", len(nodes) - 1))
        nodes[v] = {"op": op, "operands": operands}
        budget -= arity - 1
    for u in frontier:
        nodes[u] = {"op": "const", "operands": [("const", rng.randrange(MOD))]}
    return nodes


def _add_distractors(nodes: list[dict], n: int, rng: random.Random) -> None:
    """Unneeded parameters: they may read needed ones, but nothing needed reads them."""
    for _ in range(n):
        if rng.random() < 0.5 or len(nodes) < 2:
            nodes.append({"op": "const", "operands": [("const", rng.randrange(MOD))]})
        else:
            op = rng.choice(("sum", "prod", "diff"))
            a, b = rng.sample(range(len(nodes)), 2)
            nodes.append({"op": op, "operands": [("param", a), ("param", b)]})


def _name_pairs(n: int, rng: random.Random) -> list[tuple[str, str]]:
    family = rng.choice(FAMILIES)
    m = 2
    while 3 * m * m < n:
        m += 1
    layers = [rng.sample(words, m) for words in family]
    pool = [(u, v) for lay in range(3) for u in layers[lay] for v in layers[lay + 1]]
    return rng.sample(pool, n)


def _expr(names_or_values: list[str], sym: str) -> str:
    return f" {sym} ".join(names_or_values)


def _definition(p: Param, params: list[Param]) -> str:
    def ref(o):
        kind, v = o
        return str(v) if kind == "const" else params[v].phrase

    if p.op == "const":
        rhs = str(p.operands[0][1])
    elif p.op == "sum":
        parts = [ref(o) for o in p.operands]
        rhs = "the sum of " + (" , ".join(parts[:-1]) + " and " + parts[-1])
    elif p.op == "prod":
        rhs = f"{ref(p.operands[0])} times {ref(p.operands[1])}"
    else:
        rhs = f"{ref(p.operands[0])} minus {ref(p.operands[1])}"
    return f"The number of {p.phrase} equals {rhs} ."


def _solution_order(graph: Graph, rng: random.Random) -> list[int]:
    """A random dependency order of the needed parameters (DFS post-order, shuffled children)."""
    order: list[int] = []
    done: set[int] = set()

    def visit(i: int) -> None:
        if i in done:
            return
        done.add(i)
        kids = [v for kind, v in graph.params[i].operands if kind == "param"]
        rng.shuffle(kids)
        for k in kids:
            visit(k)
        order.append(i)

    visit(graph.query)
    return order


def rng_from(rng, seed) -> random.Random:
    """The random.Random to draw from: `rng` itself, or a new one seeded with `seed` (exactly one given)."""
    if (rng is None) == (seed is None):
        raise ValueError("pass exactly one of rng (random.Random) or seed (int)")
    if rng is not None:
        if not isinstance(rng, random.Random):
            raise ValueError(f"rng must be a random.Random, got {type(rng).__name__}")
        return rng
    return random.Random(check_int("seed", seed))


def generate(
    max_operations: int,
    *,
    rng: random.Random | None = None,
    seed: int | None = None,
    exact: bool = False,
    max_distractors: int | None = None,
) -> Problem:
    """One problem. n_operations == max_operations if ``exact`` else uniform in 1..max_operations.

    Distractor count is uniform in 0..max_distractors (default max(1, n_operations // 3)).
    """
    max_operations = check_int("max_operations", max_operations, lo=1, hi=MAX_OPERATIONS)
    if max_distractors is not None:
        max_distractors = check_int("max_distractors", max_distractors, lo=0)
    r = rng_from(rng, seed)
    n_ops = max_operations if exact else r.randint(1, max_operations)
    nodes = _build_needed(n_ops, r)
    n_needed = len(nodes)
    _add_distractors(nodes, r.randint(0, max(1, n_ops // 3) if max_distractors is None else max_distractors), r)

    # shuffle parameter indices so the query is not always index 0
    perm = list(range(len(nodes)))
    r.shuffle(perm)  # perm[old] = new
    names = _name_pairs(len(nodes), r)
    params: list[Param | None] = [None] * len(nodes)
    for old, nd in enumerate(nodes):
        ops = tuple((k, perm[v]) if k == "param" else (k, v) for k, v in nd["operands"])
        params[perm[old]] = Param(names[old][0], names[old][1], nd["op"], ops)
    graph = Graph(tuple(params), perm[0])
    assert len(needed(graph)) == n_needed

    # values by memoised recursion (a different path from evaluate(), which uses Kahn's order)
    memo: dict[int, int] = {}

    def value(i: int) -> int:
        if i not in memo:
            p = graph.params[i]
            vals = [v if k == "const" else value(v) for k, v in p.operands]
            memo[i] = vals[0] if p.op == "const" else apply_op(p.op, vals)
        return memo[i]

    defs = [_definition(p, graph.params) for p in graph.params]
    r.shuffle(defs)
    question = " ".join(defs) + f" Question : what is the number of {graph.params[graph.query].phrase} ?"

    order = _solution_order(graph, r)
    var = dict(zip(order, r.sample(VARIABLES, len(order))))
    steps = []
    for i in order:
        p = graph.params[i]
        head = f"Define {p.phrase} as {var[i]} ; so {var[i]} ="
        if p.op == "const":
            steps.append(f"{head} {p.operands[0][1]} .")
            continue
        sym = SYMBOLS[p.op]
        names_ = [str(v) if k == "const" else var[v] for k, v in p.operands]
        vals = [str(v) if k == "const" else str(value(v)) for k, v in p.operands]
        steps.append(f"{head} {_expr(names_, sym)} = {_expr(vals, sym)} = {value(i)} .")
    answer = value(graph.query)
    steps.append(f"Answer : {answer} .")
    n_operations = count_operations(graph)
    assert n_operations == n_ops
    return Problem(question, " ".join(steps), answer, n_operations, graph)
