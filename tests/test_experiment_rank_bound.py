"""experiments/rank_bound.py end to end on a tiny random Llama (``--tiny``).

The whole plan runs (regime search, LR grids, seeds, then the COLA comparison), and a run that is
interrupted mid-way and started again gives the same numbers as one that never stopped.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import rank_bound_report as rbr  # noqa: E402
import rankbound as rb  # noqa: E402


def _runs(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))}


def _losses(out: Path, key: str) -> list[float]:
    lines = (out / "curves" / f"{key}.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rb_once")
    rb.main(["--tiny", "--out", str(out), "--quiet"])
    return out


def test_plan_runs_to_the_end(uninterrupted: Path) -> None:
    out, d = uninterrupted, rb.TINY
    runs = _runs(out)
    q = json.loads((out / "qualification.json").read_text())
    r = q["chosen_r"]
    assert r in d.base_ranks and q["decided"]
    # search: every grid point on seed 0, the other seeds at the chosen LR only
    for m in rb.search_methods(d):
        assert all(rb.run_key(m, lr, d.seeds[0]) in runs for lr in rb.grid_of(m, d))
        lr = rb.best_lr(m, {v["key"]: v for v in runs.values()}, d)
        assert all(rb.run_key(m, lr, s) in runs for s in d.seeds)
    assert sum(1 for k in runs if k.startswith("lora1__")) == len(d.lora_lrs) + len(d.seeds) - 1
    # compare at r: the chains tied the knots they were built with, and reached their rank
    by = {v["key"]: v for v in runs.values()}
    chains = {m.name: rb.method_runs(m, by, d) for m in rb.compare_methods(r, d)}
    assert all(len(v) == len(d.seeds) for v in chains.values())
    quarter = d.steps // 4
    assert chains[f"cola4x{r}"][0]["chain"]["knot_steps"] == [quarter, 2 * quarter, 3 * quarter]
    grow = chains[f"cola4x{r}_grow"][0]["chain"]
    assert grow["knot_steps"] == [round(f * d.steps) for f in (0.1, 0.3, 0.6)]
    assert chains[f"cola8x{r}"][0]["chain"]["effective_rank_mean"] == 8 * r
    assert chains[f"cola4x{r}_down"][0]["chain"]["ranks"] == [2 * r, r, r, r]
    assert by[rb.run_key(rb.lora(r, d), d.lora_lrs[0], 0)]["chain"]["effective_rank_mean"] == r
    # training does something: the answers got likelier for every method (vs the base model)
    base_nll = json.loads((out / "base.json").read_text())["metrics"]["answer_nll"]
    assert all(v["metrics"]["answer_nll"] < base_nll for v in runs.values())
    assert all(len(_losses(out, k)) == d.steps for k in runs)
    assert not list((out / "ckpt").glob("*.pt"))  # finished runs leave no checkpoint


def test_interrupted_and_resumed_equals_uninterrupted(uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "rb"
    d = rb.TINY
    # stop inside the fourth run, after two of its checkpoints (as a kill would)
    stop = 3 * d.steps + 2 * d.ckpt_every + 1
    rb.main(["--tiny", "--out", str(out), "--quiet", "--stop-after-steps", str(stop)])
    assert len(_runs(out)) == 3
    assert len(list((out / "ckpt").glob("*.pt"))) == 1
    rb.main(["--tiny", "--out", str(out), "--quiet", "--stop-after-steps", "3"])  # again, briefly
    rb.main(["--tiny", "--out", str(out), "--quiet", "--max-runs", "2"])  # finish it and one more
    once, resumed = _runs(uninterrupted), _runs(out)
    assert len(resumed) == 5 and resumed.keys() <= once.keys()
    assert [v["timing"]["resumed"] for v in resumed.values()].count(True) == 1
    for key in resumed:
        assert resumed[key]["metrics"] == once[key]["metrics"], key
        assert resumed[key]["chain"] == once[key]["chain"], key
        assert _losses(out, key) == _losses(uninterrupted, key), key
    assert not list((out / "ckpt").glob("*.pt"))


def test_report_builds_from_partial_results(uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "partial"
    rb.main(["--tiny", "--out", str(out), "--quiet", "--max-runs", "4"])
    text = rbr.markdown(rbr.analyse(out))
    assert "not finished" in text and "| lora1 |" in text
    full = rbr.analyse(uninterrupted)
    text = rbr.markdown(full)
    assert "Gap closed" in text and "Paired differences" in text
    for path in rbr.plots(full, tmp_path):
        assert path.stat().st_size > 10_000


def test_extra_runs_are_reported_apart_against_their_lora_references(
    uninterrupted: Path, tmp_path: Path
) -> None:
    out = tmp_path / "extra"
    shutil.copytree(uninterrupted, out)
    d = rb.TINY
    rb.main(["--tiny", "--out", str(out), "--quiet", "--extra", f"cola2x2@{d.lora_lrs[0]}"])
    extra = [v for v in _runs(out).values() if v["phase"] == "extra"]
    assert sorted(v["seed"] for v in extra) == list(d.seeds)
    a = rbr.analyse(out)
    (e,) = a["extras"]
    assert e["method"].name == "cola2x2" and e["base"]["reference"] == "lora2"
    assert e["total"]["reference"] == "lora4" and e["total"]["n"] == len(d.seeds)
    assert "Supplementary runs" in rbr.markdown(a) and "| cola2x2 |" in rbr.markdown(a)
    with pytest.raises(SystemExit):  # a method the design does not have
        rb.main(["--tiny", "--out", str(out), "--quiet", "--extra", "cola3x7@0.01"])


def test_report_builds_the_same_from_packed_curves(uninterrupted: Path, tmp_path: Path) -> None:
    from _runs import CURVES_ARCHIVE, pack_curves, read_curve

    out = tmp_path / "packed"
    shutil.copytree(uninterrupted, out)
    keys = sorted(_runs(out))
    loose = {k: read_curve(out, k) for k in keys}
    assert all(len(v) == rb.TINY.steps for v in loose.values())
    pack_curves(out)
    assert not (out / "curves").exists() and (out / CURVES_ARCHIVE).is_file()
    assert {k: read_curve(out, k) for k in keys} == loose
    assert rbr.markdown(rbr.analyse(out)) == rbr.markdown(rbr.analyse(uninterrupted))
    for path in rbr.plots(rbr.analyse(out), tmp_path):
        assert path.stat().st_size > 10_000
