"""iGSM-style synthetic grade-school math (paper App. I), written from the published
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

Modules: `problem` (Param, Graph, Problem; evaluation and operation count), `generator` (generate),
`checker` (parse_answer, check_solution), `tokenizer` (IGSMTokenizer, sample_batch); every name is
importable from kvshift.tasks.igsm.
"""

from kvshift.tasks.igsm.checker import SolutionError, check_solution, parse_answer
from kvshift.tasks.igsm.generator import FAMILIES, generate
from kvshift.tasks.igsm.problem import (MAX_OPERATIONS, MOD, Graph, Param, Problem, count_operations, evaluate,
                                        evaluate_all)
from kvshift.tasks.igsm.tokenizer import IGSMTokenizer, sample_batch

__all__ = [
    "MOD",
    "MAX_OPERATIONS",
    "FAMILIES",
    "Param",
    "Graph",
    "Problem",
    "SolutionError",
    "generate",
    "evaluate",
    "evaluate_all",
    "count_operations",
    "check_solution",
    "parse_answer",
    "IGSMTokenizer",
    "sample_batch",
]
