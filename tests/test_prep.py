"""fatscale.prep as a package: what it imports, and what a re-run may delete.

The import checks run in a fresh interpreter. They rely on ``import fatscale`` not importing timm
(fatscale/__init__.py registers the models when timm is first imported).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from test_make_shards import make_tree, run, write

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "nvidia.dali", "timm")


def python(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)


def test_prep_imports_neither_torch_nor_dali():
    r = python("-c", "import sys, fatscale.prep, fatscale.prep.cli, fatscale.data.shard_format; "
                     f"print([m for m in {HEAVY!r} if m in sys.modules])")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_make_shards_help_imports_neither_torch_nor_dali():
    r = python("-X", "importtime", "data_prep/make_shards.py", "--help")
    assert r.returncode == 0 and "usage: make_shards" in r.stdout
    imported = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "fatscale.prep.cli" in imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "timm") or m.startswith("nvidia.dali")}


def test_a_run_on_a_tree_without_imagenet_class_ids_imports_no_torch(tmp_path):
    src = make_tree(tmp_path / "src", per_class=2, val_per_class=1, classes=["cat", "dog"])
    r = python("-c", "import sys; from fatscale.prep import make_shards; "
                     f"make_shards({str(src)!r}, {str(tmp_path / 'out')!r}, workers=1, progress=False, log=None); "
                     f"print([m for m in {HEAVY!r} if m in sys.modules])")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_a_rerun_removes_its_own_temporary_files_only(tmp_path):
    src = make_tree(tmp_path / "src", per_class=2, val_per_class=0)
    out = tmp_path / "out"
    run(src, out)
    state = out / ".make_shards"
    ours = [out / ".train-000000.tar.123.tmp", out / ".train-000000.idx.123.tmp", out / ".manifest.json.9.tmp",
            state / ".train-000000.json.5.tmp", state / ".params.json.5.tmp"]
    users = [out / ".notes.txt.123.tmp", out / ".bashrc", out / ".train-000000.tar.tmp", out / ".x.tar.1.tmp",
             out / "train-000000.tar.123.tmp", state / ".notes.1.tmp"]
    for p in ours + users:
        write(p, b"x")
    run(src, out)
    assert [p.name for p in ours if p.exists()] == []
    assert [p.name for p in users if not p.exists()] == []
