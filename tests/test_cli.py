import os
import subprocess
import sys

import pytest

from fxmem.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_prints_the_report_and_the_side_by_side_tables(capsys):
    assert main(["demo", "--layers", "1", "--d-model", "32", "--seq", "16", "--batch", "2", "--steps", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "fxmem report (inference" in out
    assert "aot_eager (PyTorch default partitioner)" in out and "saved MiB" in out and "step × eager" in out
    assert "rel. error" in out and "latency × torch.compile" in out
    # every pass adds its row
    for row in ("fxmem precision=bf16", "fxmem int8=weight_only", "fxmem prune 30% MLP", "PyTorch min-cut partitioner",
                "fxmem remat budget=0.5", "fxmem chunk (default), step returns the loss only"):
        assert row in out
    assert "fxmem report (training" in out and "partition:" in out
    # side by side with torch.compile, and fit's choice compiled and measured
    assert "torch.compile (Inductor)" in out and "peak × torch.compile" in out
    assert "and measured: whole step" in out


def test_explain_builtin_and_a_module_class(capsys, tmp_path):
    html = tmp_path / "r.html"
    assert main(["explain", "--html", str(html), "--show-graph", "inference"]) == 0
    out = capsys.readouterr().out
    assert "fxmem report" in out and "def forward" in out and html.exists()
    assert main(["explain", "fxmem.testing.samples:MLP", "--shape", "4,32"]) == 0
    assert "fc1_weight" not in capsys.readouterr().err


def test_bad_option_flags_exit_2_with_the_reason(capsys):
    assert main(["explain", "--options", '{"remat": {"budget": 3}}']) == 2
    assert "remat.budget" in capsys.readouterr().err


def test_bad_target_is_a_clear_exit():
    with pytest.raises(SystemExit, match="module:Class"):
        main(["explain", "not_a_target"])


def test_python_dash_m_fxmem():
    out = subprocess.run([sys.executable, "-m", "fxmem", "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert out.returncode == 0 and "demo" in out.stdout and "bench" in out.stdout
