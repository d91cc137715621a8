"""The commands: the scripts of a checkout (``python launch/slurm.py``, ...) and the console scripts of
an installed fatscale (``fatscale-slurm``, ...) are the same programs, and the installed ones work
from any directory."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
# The checkout's script of each command that has one.
CHECKOUT = {"fatscale-train": "launch/local.py", "fatscale-slurm": "launch/slurm.py",
            "fatscale-shards": "data_prep/make_shards.py", "fatscale-devcluster": "launch/devcluster.py"}


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "100"})


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_console_script_names_a_main_function(name):
    module, function = SCRIPTS[name].split(":")
    assert callable(getattr(importlib.import_module(module), function))


@pytest.mark.parametrize("name", sorted(CHECKOUT))
def test_the_installed_command_is_the_checkouts_script(name, tmp_path):
    installed = shutil.which(name, path=str(Path(sys.executable).parent))
    assert installed, f"{name}: not installed (pip install -e .)"
    from_anywhere = run([installed, "--help"], cwd=tmp_path)  # not the checkout: the installed package
    from_checkout = run([sys.executable, CHECKOUT[name], "--help"], cwd=REPO)
    assert from_anywhere.returncode == from_checkout.returncode == 0, from_anywhere.stderr + from_checkout.stderr
    # The same help after the usage lines, which may name the command typed (and wrap with its length).
    assert from_anywhere.stdout.startswith("usage: ") and from_checkout.stdout.startswith("usage: ")
    assert from_anywhere.stdout.split("\n\n", 1)[1] == from_checkout.stdout.split("\n\n", 1)[1]


def test_module_commands_keep_working_and_match_their_console_scripts(tmp_path):
    installed = shutil.which("fatscale-checkpoint", path=str(Path(sys.executable).parent))
    by_module = run([sys.executable, "-m", "fatscale.checkpoint", "verify", str(tmp_path)], cwd=tmp_path)
    by_script = run([installed, "verify", str(tmp_path)], cwd=tmp_path)
    assert by_module.returncode == by_script.returncode == 1
    assert by_module.stderr == by_script.stderr == f"{tmp_path / 'checkpoints'}: no checkpoint\n"
