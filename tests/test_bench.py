"""The benchmark scripts run in their --quick mode and report what is not a timing.

Timings are never asserted (they belong to the benchmarks, on a quiet machine). What a quick run
does pin down are byte counts and counters, which are deterministic: chainopt holds exactly the
tensors PEFT holds (plus, for bf16 weights, the exact-merge residual) and peaks no higher, with
and without knots; trainable parameters and optimizer state match; a knot compiles nothing new.
On a 4-bit base (``--quant 4bit``) the model's bytes (4-bit weights, quantization state,
factors) are PEFT's QLoRA's to the byte and chainopt's host masters are exactly 4 bytes per
adapted weight element, kept apart. The floor (no adapter, frozen weights, input gradients) holds
the base model alone: PEFT's and chainopt's resident bytes are the floor's plus their float32
factors and optimizer state.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, out: Path, *extra: str) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "bench" / script), "--quick", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== headline ==" in proc.stdout
    name = script.removesuffix(".py")
    if "--quant" in extra:  # compare_4bit_quick.json: beside, not over, the dense results
        name += f"_{extra[extra.index('--quant') + 1]}"
    payload: dict[str, Any] = json.loads((out / f"{name}_quick.json").read_text())
    return payload


#: Linear layers per block that ``--quant 4bit`` makes ``Linear4bit`` (all but ``lm_head``).
LINEARS = {"llama": 7, "opt": 6}


def _adapted_elements(spec: dict[str, Any], targets: str) -> int:
    """``out·in`` summed over the adapted layers, from the model's shape alone."""
    h, layers = spec["hidden"], spec["layers"]
    if spec["arch"] == "llama":
        inter = math.ceil(h * 8 / 3 / 32) * 32  # Llama's MLP width, as the benchmark builds it
        per = {"qv": 2 * h * h, "all": 4 * h * h + 3 * h * inter}
    else:
        per = {"qv": 2 * h * h, "all": 4 * h * h + 2 * h * 4 * h}
    return layers * per[targets]


@pytest.mark.parametrize(
    ("script", "extra"),
    [
        ("compare.py", ()),  # float32, eager and compiled (dynamo only)
        ("gpu.py", ("--modes", "eager")),  # bf16 weights; on the CPU here
        ("compare.py", ("--quant", "4bit")),  # NF4 base, float32 compute, eager and compiled
        ("gpu.py", ("--quant", "4bit", "--modes", "eager")),  # NF4 base, bf16 compute
    ],
    ids=["compare", "gpu", "compare-4bit", "gpu-4bit"],
)
def test_quick_benchmark_memory_and_counters_match_peft(
    tmp_path: Path, script: str, extra: tuple[str, ...]
) -> None:
    result = _run(script, tmp_path, *extra)
    quant = result["args"]["quant"] == "4bit"
    bf16 = result["args"]["dtype"] == "bfloat16" and not quant
    seen = set()
    for group in result["groups"]:
        rows = group["rows"]
        peft = {r["targets"]: r for r in rows if r["kind"] == "peft"}
        (floor,) = (r for r in rows if r["kind"] == "floor")
        assert floor["trainable"] == 0 and floor["opt_state_bytes"] == 0
        assert floor["host_master_bytes"] == 0 and floor["held_other_bytes"] == 0
        assert floor["resident_bytes"] == floor["model_bytes"]  # the base model, nothing else
        assert ("full" in {r["kind"] for r in rows}) != quant  # 4-bit weights: no full FT
        if quant:
            assert group["linear4bit_layers"] == LINEARS[group["arch"]] * group["spec"]["layers"]
        else:
            assert group["linear4bit_layers"] == 0
        for row in rows:
            if row["kind"] not in ("peft", "chain", "chain_knot"):
                continue
            ref = peft[row["targets"]]
            # bf16 weights carry the exact-merge residual (2 bytes per adapted weight element)
            extra_bytes = row["merge_residual_bytes"] if bf16 else 0
            # an adapter method holds the base model plus float32 factors and their AdamW state
            adds = 4 * row["trainable"] + row["opt_state_bytes"] + extra_bytes
            assert row["resident_bytes"] == floor["resident_bytes"] + adds, row["variant"]
            assert row["wall_ms_floor_x"] > 0 and row["cpu_ms_floor_x"] > 0, row["variant"]
            if row["kind"] == "peft":
                assert row["host_master_bytes"] == 0
                continue
            seen.add((group["arch"], group["mode"], row["targets"], row["kind"]))
            assert row["trainable"] == ref["trainable"], row["variant"]
            assert row["opt_state_bytes"] == ref["opt_state_bytes"], row["variant"]
            assert row["resident_bytes"] == ref["resident_bytes"] + extra_bytes, row["variant"]
            assert row["model_bytes"] == ref["model_bytes"] + extra_bytes, row["variant"]
            assert row["peak_bytes"] <= ref["peak_bytes"] + extra_bytes, row["variant"]
            assert row["held_other_bytes"] == 0, row["variant"]  # no history by default
            # 4-bit targets: one float32 master per adapted weight, in host memory, apart
            elements = _adapted_elements(group["spec"], row["targets"])
            assert row["adapted_weight_elements"] == elements, row["variant"]
            assert row["host_master_bytes"] == (4 * elements if quant else 0), row["variant"]
            if row["kind"] == "chain_knot":
                assert row["n_knots"] >= 1, row["variant"]
                if group["mode"] == "compile":
                    assert row["compiles_after_knot"] == 0, row["variant"]
            if group["mode"] == "compile":
                assert row["compiles_after_warmup"] == 0, row["variant"]
    assert len(seen) >= 8  # two models (or modes) × two target sets × with and without knots


def test_quick_scaling_times_the_knots_and_matches_peft_memory(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
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


def test_quick_gradient_init_finds_the_svds_subspace(tmp_path: Path) -> None:
    payload = _run("gradient_init.py", tmp_path)
    cases = payload["cases"]
    assert {(c["rank"], c["tokens"]) for c in cases} == {(1, 64), (8, 64), (1, 1024), (8, 1024)}
    for c in cases:  # what chainopt's A captures of the exact top-r energy (timings: not here)
        assert 0.998 < c["captured"] < 1 + 1e-5, c


def test_quick_benchmark_times_a_chained_peft_model_against_the_same_unchained(
    tmp_path: Path,
) -> None:
    result = _run(
        "compare.py", tmp_path, "--peft-chain", "--modes", "eager", "--models", "llama",
        "--targets", "qv", "--no-full",
    )  # fmt: skip
    (group,) = result["groups"]
    rows = {r["kind"]: r for r in group["rows"]}
    chained, peft = rows["peft_chain"], rows["peft"]
    assert chained["trainable"] == peft["trainable"]  # the same PEFT factors, nothing added
    assert chained["opt_state_bytes"] == peft["opt_state_bytes"]
    assert chained["wall_ms_x"] is not None and chained["paired_wall"] is not None
