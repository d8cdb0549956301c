"""The research harness: the paper's experiments (and ours beyond it), each one `Experiment` record in
`kvshift.experiments.registry`, run by `kvshift experiment NAME`, summarised into results/<name>-<scale>/
and gathered into docs/REPRODUCTION.md by `kvshift report`.

It lives in the package (not in a top-level folder) so that `kvshift experiment NAME` works from any
install; the library (ops, layers, models) never imports it.
"""
