"""Command line: every subcommand has --help; errors are reported, not raised; show-config."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from remixer.backends import _vllm_sampling
from remixer.cli import STAGE_HELP, main

COMMANDS = [*(s.replace("_", "-") for s in STAGE_HELP), "pipeline", "exclusions", "show-config"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_module_entry_point_runs_without_jax():
    code = ("import sys, remixer.cli, remixer.stages, remixer.backends; "
            "sys.exit(1 if 'jax' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    out = subprocess.run([sys.executable, "-m", "remixer", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "pipeline" in out.stdout


def test_show_config_applies_overrides(capsys):
    assert main(["show-config", "--set", "mining.top_k=7"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["mining"]["top_k"] == 7 and cfg["models"]["embedder"]["runner"] == "pooling"


def test_errors_are_reported_with_exit_code_2(tmp_path, capsys):
    code = main(["queries", "--work-dir", str(tmp_path), "--domain", "biology"])
    assert code == 2
    assert "run the 'sources' stage first" in capsys.readouterr().err
    assert main(["sources", "--work-dir", str(tmp_path), "--domain", "nope"]) == 2
    assert main(["sources", "--work-dir", str(tmp_path), "--domain", "biology",
                 "--set", "mining.topk=3"]) == 2


def test_sampling_keys_are_checked():
    assert _vllm_sampling({"temperature": 0.7, "top_p": 0.95, "top_k": 40, "max_tokens": 9,
                           "regex": None}) == {"temperature": 0.7, "top_p": 0.95, "top_k": 40,
                                               "max_tokens": 9}
    assert "top_k" not in _vllm_sampling({"top_k": -1})
    with pytest.raises(ValueError, match="unknown sampling keys"):
        _vllm_sampling({"temprature": 1.0})
