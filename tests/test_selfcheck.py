"""`mechsink selfcheck` on the CPU, and the GPU tier (`pytest -m gpu`) where CUDA exists."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import mechsink.cli
from mechsink.selfcheck import CHECKS, selfcheck

FAST = ["planted detection", "planted ablation vs null", "self-patching identity", "TransformerLens agreement"]


def test_known_answer_checks_pass_on_cpu():
    r = CliRunner().invoke(mechsink.cli.app, ["selfcheck", "--only", ",".join(FAST), "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [x["name"] for x in rows] == FAST and all(x["passed"] for x in rows)
    det = rows[0]["value"]
    assert det.startswith("P=1.000 R=1.000")


def test_a_failing_check_fails_the_command(tmp_path):
    """The twin check cannot get its tokenizer without npm and without a cache: FAIL and exit 1."""
    env = {**os.environ, "MECHSINK_CACHE": str(tmp_path), "PATH": os.path.dirname(sys.executable)}
    p = subprocess.run([sys.executable, "-m", "mechsink.cli", "selfcheck", "--only", "twin end to end"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "FAIL  twin end to end" in p.stdout and "npm is not installed" in p.stdout
    assert "0/1 passed" in p.stdout


def test_bad_options_are_one_line_errors():
    r = CliRunner().invoke(mechsink.cli.app, ["selfcheck", "--only", "nonsense"])
    assert r.exit_code == 2 and "unknown check" in r.stderr
    if not torch.cuda.is_available():
        r = CliRunner().invoke(mechsink.cli.app, ["selfcheck", "--device", "cuda"])
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU tier runs where torch sees one")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_selfcheck_on_the_gpu(dtype):
    rows = selfcheck("cuda", dtype)
    assert [r.name for r in rows] == [n for n, _, _ in CHECKS]
    failed = [(r.name, r.value) for r in rows if not r.passed]
    assert not failed
    assert sum(r.seconds for r in rows) < 120
