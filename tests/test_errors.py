"""Every CLI verb: a user mistake is one line on stderr and exit status 2; a bug keeps its traceback."""

import subprocess
import sys

import pytest

from kvshift.cli import main
from kvshift.errors import run_command


def _one_line(capsys, verb: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"kvshift {verb}: error: "), err
    return err


def test_train_unknown_key_is_one_line(capsys, tmp_path):
    assert main(["train", "debug", "--out", str(tmp_path / "r"), "--set", "train.stepz=4"]) == 2
    err = _one_line(capsys, "train")
    assert "stepz" in err and "debug.toml" in err and "'steps'" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv,needle", [
    (["data", "tokenize", "--corpus", "/nonexistent/c", "--tokenizer", "/nonexistent/t.json", "--out", "{tmp}/sh"],
     "/nonexistent/t.json"),
    (["data", "train-tokenizer", "--corpus", "/nonexistent/c", "--out", "{tmp}/t.json", "--vocab-size", "300"],
     "/nonexistent/c/manifest.json"),
    (["data", "build-corpus", "--no-sources", "--files", "/nonexistent/x.txt", "--out", "{tmp}/c"], "/nonexistent/x.txt"),
    (["data", "unpack", "/nonexistent/p.tar.xz", "--out", "{tmp}/u"], "/nonexistent/p.tar.xz"),
    (["data", "pack", "--shards", "/nonexistent/sh", "--out", "{tmp}/p.tar.xz"], "/nonexistent/sh/meta.json"),
    (["plot", "/nonexistent/run", "--out", "{tmp}/x.png"], "/nonexistent/run"),
], ids=["tokenize", "train-tokenizer", "build-corpus", "unpack", "pack", "plot"])
def test_data_verbs_missing_files_are_one_line(capsys, tmp_path, argv, needle):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    verb = " ".join(argv[:2]) if argv[0] == "data" else argv[0]
    assert needle in _one_line(capsys, verb)


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    import kvshift.train.cli as T

    def broken(*a, **k):
        raise AttributeError("'NoneType' object has no attribute 'step'")

    monkeypatch.setattr(T, "train", broken)
    with pytest.raises(AttributeError):
        main(["train", "debug", "--out", str(tmp_path / "r")])
    with pytest.raises(KeyError):
        run_command("x", lambda a: {}["missing"], None)


def test_traceback_on_request(tmp_path):
    with pytest.raises(ValueError, match="stepz"):
        main(["--traceback", "train", "debug", "--out", str(tmp_path / "r"), "--set", "train.stepz=4"])


def test_console_script_exit_status(tmp_path):
    """The real process: exit status 2 and exactly one stderr line, no traceback."""
    p = subprocess.run([sys.executable, "-m", "kvshift.cli", "train", "debug", "--out", str(tmp_path / "r"),
                        "--set", "optim.lr=fast"], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert "optim.lr" in p.stderr and "'fast'" in p.stderr
