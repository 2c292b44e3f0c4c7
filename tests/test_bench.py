"""The benchmark scripts run in their --quick mode and report what is not a timing.

Timings are never asserted (they belong to the benchmarks, on a quiet machine). What a quick run
does pin down are byte counts and counters, which are deterministic: chainopt holds exactly the
tensors PEFT holds (plus, for bf16 weights, the exact-merge residual) and peaks no higher, with
and without knots; trainable parameters and optimizer state match; a knot compiles nothing new.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, out: Path, *extra: str) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / script), "--quick", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== headline ==" in proc.stdout
    name = script.removesuffix(".py")
    payload: dict[str, Any] = json.loads((out / f"{name}_quick.json").read_text())
    return payload


@pytest.mark.parametrize(
    ("script", "extra"),
    [
        ("compare.py", ()),  # float32, eager and compiled (dynamo only)
        ("gpu.py", ("--modes", "eager")),  # bf16 weights; on the CPU here
    ],
)
def test_quick_benchmark_memory_and_counters_match_peft(
    tmp_path: Path, script: str, extra: tuple[str, ...]
) -> None:
    result = _run(script, tmp_path, *extra)
    bf16 = result["args"]["dtype"] == "bfloat16"
    seen = set()
    for group in result["groups"]:
        rows = group["rows"]
        peft = {r["targets"]: r for r in rows if r["kind"] == "peft"}
        for row in rows:
            if row["kind"] not in ("chain", "chain_knot"):
                continue
            ref = peft[row["targets"]]
            seen.add((group["arch"], group["mode"], row["targets"], row["kind"]))
            assert row["trainable"] == ref["trainable"], row["variant"]
            assert row["opt_state_bytes"] == ref["opt_state_bytes"], row["variant"]
            # bf16 weights carry the exact-merge residual (2 bytes per adapted weight element)
            extra_bytes = row["merge_residual_bytes"] if bf16 else 0
            assert row["resident_bytes"] == ref["resident_bytes"] + extra_bytes, row["variant"]
            assert row["peak_bytes"] <= ref["peak_bytes"] + extra_bytes, row["variant"]
            assert row["held_other_bytes"] == 0, row["variant"]  # no history by default
            if row["kind"] == "chain_knot":
                assert row["n_knots"] >= 1, row["variant"]
                if group["mode"] == "compile":
                    assert row["compiles_after_knot"] == 0, row["variant"]
    assert len(seen) >= 8  # two models (or modes) × two target sets × with and without knots


def test_quick_scaling_times_the_knots_and_matches_peft_memory(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "scaling.py"), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "scaling_quick.json").read_text())
    assert (tmp_path / "scaling_quick.png").exists()
    for rows in result["sweeps"].values():
        peft = {(r["hidden"], r["seq"]): r for r in rows if r["kind"] == "peft"}
        for r in rows:
            if r["kind"] == "chain_knot":
                assert r["n_knots"] >= 1, r["variant"]  # the schedule's knots and the extra ones
            if r["kind"] in ("chain", "chain_knot"):
                assert r["peak_bytes"] <= peft[r["hidden"], r["seq"]]["peak_bytes"], r["variant"]
