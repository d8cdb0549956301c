"""Atomic writes from several processes at once: each writes its own temporary file, so none fails and the
result is one writer's whole file (jobs of one experiment summarise into one directory concurrently)."""

import json
import multiprocessing

from kvshift.utils.io import write_json_atomic


def _writer(args):
    path, k = args
    for i in range(40):
        write_json_atomic(path, {"writer": k, "i": i, "pad": "x" * 2000})
    return k


def test_concurrent_atomic_writes_to_one_file(tmp_path):
    path = tmp_path / "summary.json"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        assert sorted(pool.map(_writer, [(str(path), k) for k in range(3)])) == [0, 1, 2]
    obj = json.loads(path.read_text())
    assert obj["i"] == 39 and obj["writer"] in (0, 1, 2)
    assert not list(tmp_path.glob("*.tmp"))
