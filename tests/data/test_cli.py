import argparse
import json

from kvshift.data import cli


def _run(argv):
    parser = argparse.ArgumentParser(prog="kvshift")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_end_to_end(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    with open(src, "w") as f:
        for i in range(40):
            f.write(json.dumps({"body": f"Record {i}: " + "the quick brown fox jumps over the lazy dog. " * (1 + i % 5)}) + "\n")
    c, tok, sh = tmp_path / "c", tmp_path / "tok.json", tmp_path / "sh"
    assert _run(["data", "build-corpus", "--no-sources", "--files", str(src), "--text-field", "body",
                 "--files-domain", "wiki", "--out", str(c), "--val-fraction", "0.25"]) == 0
    assert json.loads((c / "manifest.json").read_text())["by_domain"]["wiki"]["documents"] == 40
    assert _run(["data", "train-tokenizer", "--corpus", str(c), "--vocab-size", "300", "--out", str(tok)]) == 0
    assert _run(["data", "tokenize", "--corpus", str(c), "--tokenizer", str(tok), "--out", str(sh)]) == 0
    assert _run(["data", "pack", "--shards", str(sh), "--out", str(tmp_path / "p.tar.xz"), "--preset", "1"]) == 0
    assert _run(["data", "unpack", str(tmp_path / "p.tar.xz"), "--out", str(tmp_path / "u")]) == 0
    assert (tmp_path / "u" / "train.tokens.bin").read_bytes() == (sh / "train.tokens.bin").read_bytes()
    assert "tokens/s" in capsys.readouterr().out
