"""iGSM-style synthetic grade-school math (paper App. I; PAPER.md §3), written from the published
description in Ye, Xu, Li & Allen-Zhu (2024), "Physics of Language Models: Part 2.1". No third-party
generator is used; this is a simplified re-implementation, not a byte-compatible copy.

What a problem looks like
-------------------------
A random 4-layer hierarchy of entity categories (e.g. schools -> rooms -> containers -> supplies, or
zoos -> enclosures -> animals -> belongings; a random subset of items per layer) gives *instance
parameters* named by an (upper item, lower item) pair, "each Riverview 's studio" = the number of
studios in each Riverview. Each parameter is defined either as a constant or as an expression of
other parameters (and at most one constant):

    sum   "the sum of A and B" / "the sum of A , B and C"     (2 or 3 operands)
    prod  "A times B"                                          (2 operands)
    diff  "A minus B"                                          (2 operands)

All arithmetic is modulo 23 (constants and answers are 0..22). The statement lists every definition
in shuffled order, including distractors the question does not need, then asks for one parameter.
The solution defines the needed parameters in a dependency (topological) order, one step each:

    Define each Riverview 's studio as a ; so a = 5 .
    Define each studio 's backpack as b ; so b = a + 3 = 5 + 3 = 8 .
    ...
    Answer : 8 .

Difficulty
----------
An expression with r operands costs r - 1 arithmetic operations; a constant costs 0. The problem's
``n_operations`` is the total over the parameters the question needs (the query and all its
ancestors); distractors are not counted. ``generate(max_operations, exact=True)`` makes
n_operations == max_operations exactly (use for test sets: Te15, Te24); with ``exact=False``
(default) n_operations is drawn uniformly from 1..max_operations (training sets: Tr12, Tr21).

Simplifications versus Ye et al.: no abstract parameters ("how many backpacks does Riverview have
in total") and no chunked multi-operation arithmetic; only instance parameters with
sum/product/difference definitions. Variable names are single letters (a-z, A-Z), which bounds
max_operations to 25 (at most 2·ops + 1 needed parameters).
"""

from __future__ import annotations

import random
import string
from collections import deque
from dataclasses import dataclass

import torch

from kvshift.tasks.common import check_int

__all__ = [
    "MOD",
    "Param",
    "Graph",
    "Problem",
    "SolutionError",
    "generate",
    "evaluate",
    "count_operations",
    "check_solution",
    "parse_answer",
    "IGSMTokenizer",
    "sample_batch",
]

MOD = 23
MAX_OPERATIONS = 25
_SYM = {"sum": "+", "prod": "*", "diff": "-"}
_VARS = tuple(string.ascii_lowercase + string.ascii_uppercase)

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
_TEMPLATE_WORDS = (
    "The number of each 's equals the sum of and , times minus . Question : what is ? "
    "Define as ; so = + * - Answer"
).split()


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


class SolutionError(ValueError):
    """The solution text does not check out against the problem's graph."""


# ----------------------------------------------------------------------------- graph queries

def _needed(graph: Graph) -> set[int]:
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
    return sum(len(graph.params[i].operands) - 1 for i in _needed(graph) if graph.params[i].op != "const")


def _apply(op: str, vals: list[int]) -> int:
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
        vals[i] = operand_vals[0] % MOD if p.op == "const" else _apply(p.op, operand_vals)
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


# ----------------------------------------------------------------------------- generation

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


def _rng_from(rng, seed) -> random.Random:
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
    r = _rng_from(rng, seed)
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
    assert len(_needed(graph)) == n_needed

    # values by memoised recursion (a different path from evaluate(), which uses Kahn's order)
    memo: dict[int, int] = {}

    def value(i: int) -> int:
        if i not in memo:
            p = graph.params[i]
            vals = [v if k == "const" else value(v) for k, v in p.operands]
            memo[i] = vals[0] if p.op == "const" else _apply(p.op, vals)
        return memo[i]

    defs = [_definition(p, graph.params) for p in graph.params]
    r.shuffle(defs)
    question = " ".join(defs) + f" Question : what is the number of {graph.params[graph.query].phrase} ?"

    order = _solution_order(graph, r)
    var = dict(zip(order, r.sample(_VARS, len(order))))
    steps = []
    for i in order:
        p = graph.params[i]
        head = f"Define {p.phrase} as {var[i]} ; so {var[i]} ="
        if p.op == "const":
            steps.append(f"{head} {p.operands[0][1]} .")
            continue
        sym = _SYM[p.op]
        names_ = [str(v) if k == "const" else var[v] for k, v in p.operands]
        vals = [str(v) if k == "const" else str(value(v)) for k, v in p.operands]
        steps.append(f"{head} {_expr(names_, sym)} = {_expr(vals, sym)} = {value(i)} .")
    answer = value(graph.query)
    steps.append(f"Answer : {answer} .")
    n_operations = count_operations(graph)
    assert n_operations == n_ops
    return Problem(question, " ".join(steps), answer, n_operations, graph)


# ----------------------------------------------------------------------------- checking

def parse_answer(solution_text: str) -> int | None:
    """The integer after the final 'Answer :', or None if absent/malformed."""
    words = solution_text.split()
    try:
        k = len(words) - 1 - words[::-1].index("Answer")
        return int(words[k + 2])
    except (ValueError, IndexError):
        return None


def check_solution(problem: Problem) -> list[tuple[str, int]]:
    """Parse the solution text back and verify every step; returns [(variable, value)] in order.

    Checks per step: the parameter named exists; its variable is fresh; the written expression uses
    exactly the parameter's operands in order (parameters by their already-defined variables, so the
    order respects dependencies; constants verbatim) with the right operator; the substituted values
    equal the variables' values; the result is the operation mod 23. Finally the defined parameters
    are exactly the needed ones and the stated answer is the query's value. Raises SolutionError.
    """
    graph = problem.graph
    by_name = {(p.parent, p.child): i for i, p in enumerate(graph.params)}
    words = problem.solution_text.split()
    sentences: list[list[str]] = []
    cur: list[str] = []
    for w in words:
        if w == ".":
            sentences.append(cur)
            cur = []
        else:
            cur.append(w)
    if cur:
        raise SolutionError(f"trailing text without '.': {' '.join(cur)}")
    if not sentences or sentences[-1][:2] != ["Answer", ":"] or len(sentences[-1]) != 3:
        raise SolutionError("solution must end with 'Answer : <value> .'")

    var_of: dict[int, str] = {}
    val_of: dict[str, int] = {}
    out: list[tuple[str, int]] = []
    for n, s in enumerate(sentences[:-1]):
        if len(s) < 11 or s[0] != "Define" or s[1] != "each" or s[3] != "'s" or s[5] != "as" or s[7:9] != [";", "so"]:
            raise SolutionError(f"step {n}: malformed: {' '.join(s)}")
        key = (s[2], s[4])
        if key not in by_name:
            raise SolutionError(f"step {n}: unknown parameter {key}")
        i = by_name[key]
        x = s[6]
        if x in val_of or i in var_of:
            raise SolutionError(f"step {n}: variable {x} or parameter {key} defined twice")
        if s[9] != x or s[10] != "=":
            raise SolutionError(f"step {n}: expected '{x} =' after 'so'")
        p = graph.params[i]
        rhs = s[11:]
        if p.op == "const":
            if rhs != [str(p.operands[0][1])]:
                raise SolutionError(f"step {n}: constant {key} should be {p.operands[0][1]}, got {rhs}")
            value = p.operands[0][1]
        else:
            sym = _SYM[p.op]
            k = len(p.operands)
            L = 2 * k - 1
            if len(rhs) != 2 * L + 3 or rhs[L] != "=" or rhs[2 * L + 1] != "=":
                raise SolutionError(f"step {n}: malformed expression {' '.join(rhs)}")
            names, vals = rhs[0:L:2], rhs[L + 1 : 2 * L + 1 : 2]
            if any(t != sym for t in rhs[1:L:2] + rhs[L + 2 : 2 * L + 1 : 2]):
                raise SolutionError(f"step {n}: operator should be {sym}")
            expect_vals = []
            for (kind, v), name in zip(p.operands, names):
                if kind == "const":
                    if name != str(v):
                        raise SolutionError(f"step {n}: constant operand should be {v}, got {name}")
                    expect_vals.append(v)
                else:
                    if v not in var_of:
                        raise SolutionError(f"step {n}: uses {graph.params[v].phrase} before defining it")
                    if name != var_of[v]:
                        raise SolutionError(f"step {n}: operand should be {var_of[v]}, got {name}")
                    expect_vals.append(val_of[name])
            if [str(v) for v in expect_vals] != vals:
                raise SolutionError(f"step {n}: substituted values {vals} should be {expect_vals}")
            value = _apply(p.op, expect_vals)
            if rhs[-1] != str(value):
                raise SolutionError(f"step {n}: result should be {value}, got {rhs[-1]}")
        var_of[i] = x
        val_of[x] = value
        out.append((x, value))

    if set(var_of) != _needed(graph):
        raise SolutionError("solution does not define exactly the needed parameters")
    if sentences[-1][2] != str(val_of[var_of[graph.query]]):
        raise SolutionError(f"answer {sentences[-1][2]} is not the query's value {val_of[var_of[graph.query]]}")
    if parse_answer(problem.solution_text) != problem.answer:
        raise SolutionError("Problem.answer disagrees with the solution text")
    return out


# ----------------------------------------------------------------------------- tokenizer / batches

class IGSMTokenizer:
    """Word-level tokenizer with a fixed vocabulary (built deterministically from the word lists).

    Ids: 0 <pad>, 1 <bos>, 2 <sep> (between question and solution), 3 <eos>, then the sorted words.
    Texts are whitespace-separated words (the generator puts spaces around punctuation).
    """

    SPECIALS = ("<pad>", "<bos>", "<sep>", "<eos>")

    def __init__(self):
        words = set(_TEMPLATE_WORDS) | set(_VARS) | {str(v) for v in range(MOD)}
        for fam in FAMILIES:
            for layer in fam:
                words |= set(layer)
        self.itos = list(self.SPECIALS) + sorted(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.sep_id, self.eos_id = range(4)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[w] for w in text.split()]
        except KeyError as e:
            raise ValueError(f"text contains a word outside the vocabulary: {e.args[0]!r}") from None

    def decode(self, ids) -> str:
        return " ".join(self.itos[int(i)] for i in ids if int(i) != self.pad_id)


def sample_batch(
    batch_size: int,
    max_operations: int,
    *,
    rng: random.Random | None = None,
    seed: int | None = None,
    exact: bool = False,
    tokenizer: IGSMTokenizer | None = None,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, T) int64 and loss_mask (B, T) bool for training.

    Row layout: <bos> question <sep> solution <eos>, right-padded with <pad> (0) to the longest row
    (or to ``seq_len``). loss_mask[b, p] is True when tokens[b, p + 1] is a solution token or <eos>
    (the same next-token convention as the other tasks).
    """
    batch_size = check_int("batch_size", batch_size, lo=1)
    r = _rng_from(rng, seed)
    tok = tokenizer or IGSMTokenizer()
    rows, starts = [], []
    for _ in range(batch_size):
        p = generate(max_operations, rng=r, exact=exact)
        q = [tok.bos_id] + tok.encode(p.question_text) + [tok.sep_id]
        rows.append(q + tok.encode(p.solution_text) + [tok.eos_id])
        starts.append(len(q))
    T = max(len(x) for x in rows)
    if seq_len is not None:
        seq_len = check_int("seq_len", seq_len, lo=1)
        if T > seq_len:
            raise ValueError(f"seq_len={seq_len} is shorter than a generated row ({T} tokens)")
        T = seq_len
    tokens = torch.full((batch_size, T), tok.pad_id, dtype=torch.int64)
    mask = torch.zeros((batch_size, T), dtype=torch.bool)
    for b, (x, s) in enumerate(zip(rows, starts)):
        tokens[b, : len(x)] = torch.tensor(x, dtype=torch.int64)
        mask[b, s - 1 : len(x) - 1] = True  # predicting tokens s .. len(x)-1
    return tokens, mask
