import json
import subprocess
import sys

from kvshift.cli import main


def test_help_and_info(capsys):
    assert main([]) == 0
    assert "info" in capsys.readouterr().out
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "kvshift" in info["attention_kinds"] and info["torch"]


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "kvshift.cli", "info"], capture_output=True, text=True, check=True)
    assert "attention_kinds" in out.stdout
