"""lm-evaluation-harness task configs over the local benchmark data (kvshift.eval.data).

One YAML per task; `utils.py` holds the `!function` hooks they name (lm-eval resolves them relative
to the YAML file). Every task loads its documents through `custom_dataset`, so no task touches the
network or the HuggingFace hub.
"""
