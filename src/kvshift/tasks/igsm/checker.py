"""Scoring iGSM solutions: the final answer, and a step-by-step check of a solution text against the
problem's graph (see kvshift.tasks.igsm)."""

from __future__ import annotations

from kvshift.tasks.igsm.problem import SYMBOLS, Problem, apply_op, needed

__all__ = ["SolutionError", "parse_answer", "check_solution"]


class SolutionError(ValueError):
    """The solution text does not check out against the problem's graph."""


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
            sym = SYMBOLS[p.op]
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
            value = apply_op(p.op, expect_vals)
            if rhs[-1] != str(value):
                raise SolutionError(f"step {n}: result should be {value}, got {rhs[-1]}")
        var_of[i] = x
        val_of[x] = value
        out.append((x, value))

    if set(var_of) != needed(graph):
        raise SolutionError("solution does not define exactly the needed parameters")
    if sentences[-1][2] != str(val_of[var_of[graph.query]]):
        raise SolutionError(f"answer {sentences[-1][2]} is not the query's value {val_of[var_of[graph.query]]}")
    if parse_answer(problem.solution_text) != problem.answer:
        raise SolutionError("Problem.answer disagrees with the solution text")
    return out
