"""experiments/pretrain.py end to end on a tiny Llama (``--quick``) and a few stdlib files.

The whole plan runs (warm starts, LR grids with their edge extension, the gate, the
confirmation, the references, the diagnostic variants); a plan that is killed, paused and
stopped by its time limit, then started again, gives bitwise the numbers of one that never
stopped; the report builds from partial results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import pretrain as pt  # noqa: E402
import pretrain_report as ptr  # noqa: E402

D = pt.TINY


def _run(out: Path, *flags: str) -> int:
    return pt.main(["--quick", "--out", str(out), "--quiet", *flags])


def _arm_runs(out: Path) -> dict[str, dict]:
    return {k: v for k, v in pt.finished(out).items() if not k.startswith("warm__")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pt_once")
    assert _run(out) == 0
    return out


def test_file_split_is_by_path_and_about_five_percent() -> None:
    _root, names = pt.stdlib_files(pt.Design())
    held = [n for n in names if pt.held_out(n, pt.Design())]
    assert len(names) > 500 and 0.03 < len(held) / len(names) < 0.07
    assert all(pt.held_out(n, pt.Design()) for n in held)  # a pure function of the path
    data = pt.load_data(D)
    assert data.train.shape[1] == D.seq_len and data.heldout.shape == (D.eval_seqs, D.seq_len)
    # no held-out sequence occurs in the training set
    train_rows = {bytes(r.tolist()) for r in data.train}
    assert not any(bytes(r.tolist()) in train_rows for r in data.heldout)


def test_plan_runs_to_the_end(uninterrupted: Path) -> None:
    out = uninterrupted
    runs = pt.finished(out)
    arms = _arm_runs(out)
    g = json.loads((out / "gate.json").read_text())
    assert g["decided"] and g["best_chain"] in {c.name for c in pt.gate_chains(D)}
    lo = pt.lora_arm(D.rank)
    grid = pt.grid(lo, runs, D)
    assert set(D.lora_lrs) <= set(grid) and len(grid) in (len(D.lora_lrs), len(D.lora_lrs) + 1)
    assert all(pt.run_key(lo, lr, 0) in runs for lr in grid)
    best = pt.arm_by_name(g["best_chain"], D)
    for seed in D.seeds:  # the confirmation: LoRA r and the best chain on every seed
        assert pt.run_key(lo, pt.lr_of(lo, runs, D), seed) in runs
        assert pt.run_key(best, pt.lr_of(best, runs, D), seed) in runs
        assert f"warm__s{seed}" in runs
    names = {v["arm"]["name"] for v in arms.values()}
    assert {"full", f"lora{2 * D.rank}"} <= names  # the references (grid chain: 2 links)
    assert f"chain{best.link_steps}_none" in names and any(n.endswith("_grad") for n in names)
    for v in arms.values():
        arm = pt.arm_by_name(v["arm"]["name"], D)
        assert v["evals"][-1][0] == D.steps and v["final_eval"] < v["warm_eval"]
        if arm.link_steps:  # every chain tied its knots and reached its total rank
            assert v["chain"]["knot_steps"] == arm.knots(D.steps)
            assert v["chain"]["effective_rank_mean"] == arm.total_rank(D.steps)
            assert len(v["chain"]["link_norm_mean"]) == arm.links(D.steps)
        rows = pt.curve_rows(out, v["key"])
        assert [r["step"] for r in rows if "loss" in r] == list(range(1, D.steps + 1))
        assert sum(1 for r in rows if r.get("knot")) == len(arm.knots(D.steps))
    assert not list((out / "ckpt").glob("*__lr*.pt"))  # finished arms leave no checkpoint
    assert not list((out / "curves").glob("*.jsonl"))  # only the gzipped curves remain


def test_interrupted_and_resumed_equals_uninterrupted(uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "pt"
    # a kill inside the fourth arm (a chain), after one of its checkpoints (no save at the kill)
    assert _run(out, "--stop-after-steps", str(3 * D.steps + D.ckpt_every + 2)) == 3
    assert len(_arm_runs(out)) == 3
    (ckpt,) = (out / "ckpt").glob("*__lr*.pt")
    assert ckpt.name.startswith("chain")
    # a clean pause between checkpoints (saved at the pause), then the time limit, then a kill
    # just after the chain's knot: every restart resumes that chain from a different point
    assert _run(out, "--pause-after-steps", "3") == 2
    assert _run(out, "--time-limit", "1", "--stop-margin", "1") == 2  # stops after one step
    assert _run(out, "--stop-after-steps", "5") == 3
    assert _run(out) == 0
    once, resumed = pt.finished(uninterrupted), pt.finished(out)
    assert resumed.keys() == once.keys()
    resumed_keys = [k for k, v in resumed.items() if v.get("timing", {}).get("resumed")]
    assert resumed_keys == [ckpt.stem]
    for key, r in resumed.items():
        if key.startswith("warm__"):
            assert r["train_losses"] == once[key]["train_losses"], key
            assert r["eval_loss"] == once[key]["eval_loss"], key
            continue
        for f in ("final_eval", "evals", "update", "update_per_module", "chain", "lr"):
            assert r[f] == once[key][f], (key, f)
        assert pt.curve_rows(out, key) == pt.curve_rows(uninterrupted, key), key


def test_another_design_is_refused(uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "other"
    (out / "runs").mkdir(parents=True)
    key = next(iter(_arm_runs(uninterrupted)))
    r = json.loads((uninterrupted / "runs" / f"{key}.json").read_text())
    r["design"]["steps"] += 1
    (out / "runs" / f"{key}.json").write_text(json.dumps(r))
    with pytest.raises(SystemExit, match="another design"):
        _run(out)


def test_report_builds_from_partial_results(uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "partial"
    assert _run(out, "--max-runs", "1") == 0  # LoRA r at the first grid LR, then it stops
    # the grid chain at that LR, killed two steps after its knot (checkpoint at the knot)
    assert _run(out, "--stop-after-steps", str(D.grid_link + 2)) == 3
    a = ptr.analyse(out)
    text = ptr.markdown(a)
    assert "**Gate:** not finished." in text and "Running or interrupted" in text
    assert "not finished" in text and f"| lora{D.rank} |" in text
    # the chain in progress against the finished LoRA: identical up to its knot, then not
    (running,) = a["running"]
    paired = dict(running["paired"])
    assert all(paired[s] == 0.0 for s in paired if s <= D.grid_link)
    assert paired[D.grid_link + D.after_knot[0]] != 0.0
    assert f"| chain{D.grid_link}_prune (running) | {D.grid_link} | +0.0000 |" in text
    full = ptr.analyse(uninterrupted)
    text = ptr.markdown(full)
    assert "**Gate (seed 0):**" in text and "What a knot costs" in text
    assert "| full | reference |" in text
    paths = ptr.plots(full, tmp_path / "img")
    assert len(paths) == 5 and all(p.stat().st_size > 10_000 for p in paths)
    # the tiny design's chains finish on both seeds: the link-length curve over seeds; its
    # LoRA r*L reference on seed 0: chains and LoRA against the total rank
    assert [p.name for p in paths[-2:]] == ["pretrain_link_length.png", "pretrain_rank.png"]
    assert ptr.markdown(ptr.analyse(tmp_path / "empty")).startswith("Experiment 6: no finished")


def test_seeds_stage_finishes_one_reference_on_every_seed_before_the_next() -> None:
    """With a chain ahead at the gate, the plan's last stage runs the best chain's LoRA r*L on
    every seed, then the other chains' LoRA r*L from the lowest rank up, each on every seed: a
    session that stops early leaves whole paired comparisons, not one seed of each."""
    d = pt.Design()
    runs: dict[str, dict] = {}
    order: list[tuple[str, str, int]] = []
    keys: list[str] = []
    while todo := pt.next_runs(runs, d):
        stage, arm, lr, seed = todo[0]
        # chains ahead of LoRA r (the 1500-step links the most), full rank ahead of all
        loss = 0.5 if arm.kind == "full" else 2.0 - arm.link_steps / 1e4
        keys.append(pt.run_key(arm, lr, seed))
        runs[keys[-1]] = {"final_eval": loss}
        order.append((stage, arm.name, seed))
    best = pt.chain_arm(d, max(d.link_steps), "prune")
    refs = [(a, s) for st, a, s in order if st == "seeds" and a.startswith("lora")]
    ranks = sorted({pt.chain_arm(d, n, "prune").total_rank(d.steps) for n in d.link_steps})
    first = best.total_rank(d.steps)
    want = [(f"lora{first}", s) for s in d.seeds]
    want += [(f"lora{r}", s) for r in ranks if r != first for s in d.seeds]
    # a reference the earlier stages already ran on the first seed is not run again
    ran_before = {(a, s) for st, a, s in order if st != "seeds"}
    assert refs == [w for w in want if w not in ran_before]
    assert len(keys) == len(set(keys))  # nothing runs twice
