"""experiments/paper_protocol.py (experiment 5) on a tiny random Llama and on fabricated results.

The whole staged plan runs end to end on synthetic tasks (``--tiny``); a plan interrupted inside a
run and resumed gives bitwise the numbers of one that never stopped; the pre-registered stage
rules (gate, LR choice, decision) do what docs/results.md section 5.1 says on fabricated results;
and the report builds from partial results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import paper_protocol as pp  # noqa: E402

TINY_ARGS = ["--tiny", "--quiet", "--wait", "0.01", "--no-plots"]
VOLATILE = {"train_seconds", "date_utc", "git_commit", "machine"}


def _runs(out: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pp_once")
    pp.main(["run", *TINY_ARGS, "--out", str(out)])
    return out


def test_plan_runs_every_stage_to_the_end(uninterrupted: Path) -> None:
    d, runs = pp.TINY, _runs(uninterrupted)
    by_key = {r["key"]: r for r in runs.values()}
    g = pp.gate(by_key, d)
    assert g["decided"] and sorted(g["kept"]) == sorted(d.tasks)  # the tiny gate passes all
    assert not g["need_fifth"] and not any(r["task"] == d.fifth for r in runs.values())
    for task in g["kept"]:
        for m in pp.METHODS:
            missing, lr = pp.lr_grid(by_key, d, task, m)
            assert missing == [] and lr is not None
            seeds = d.primary_seeds if m in pp.PRIMARY else d.secondary_seeds
            assert all(pp.run_key(task, m, lr, s) in by_key for s in seeds)
    r0 = next(iter(runs.values()))
    spe = r0["steps_per_epoch"]
    assert spe == 3 and r0["n_train"] == d.n_train  # 24 of a 48-example pool, batch 8
    for r in runs.values():
        assert r["knot_steps"] == [e * spe for e in pp.METHODS[r["method"]][1]]
        assert len(r["losses"]) == r["steps"] == spe * d.epochs
        assert [e["epoch"] for e in r["epochs"]] == list(range(1, d.epochs + 1))
        best = r["epochs"][r["best_epoch"] - 1]
        assert best["val_acc"] == max(e["val_acc"] for e in r["epochs"]) == r["best_val_acc"]
        assert all(e["val_acc"] < best["val_acc"] for e in r["epochs"][: r["best_epoch"] - 1])
        assert r["test_best"] == best["test_acc"] and r["test_final"] == r["epochs"][-1]["test_acc"]
    down = next(r for r in runs.values() if r["method"] == "cola2_down")
    assert down["effective_rank_mean"] == pytest.approx(8 + 4, abs=0.5)  # ranks 8 then 4
    decision = json.loads((uninterrupted / "decision.json").read_text())["decision"]
    assert decision["verdict"] in {"confirmed", "refuted", "inconclusive"}
    if decision["verdict"] != "inconclusive" and decision["after"] == "primary":
        assert not any(r["seed"] in d.extension_seeds for r in runs.values())
    assert not list((uninterrupted / "ckpt").glob("*.pt"))  # finished runs leave no checkpoint


def test_interrupted_and_resumed_equals_uninterrupted(uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "pp"
    steps = pp.TINY.epochs * 3
    # stop inside the third run, in its third epoch (after two epoch checkpoints), as a kill would
    pp.main(["run", *TINY_ARGS, "--out", str(out), "--stop-after-steps", str(2 * steps + 7)])
    assert len(_runs(out)) == 2
    [ckpt] = list((out / "ckpt").glob("*.pt"))
    pp.main(["run", *TINY_ARGS, "--out", str(out), "--stop-after-steps", "1"])  # again, briefly
    assert ckpt.exists() and len(_runs(out)) == 2
    pp.main(["run", *TINY_ARGS, "--out", str(out)])  # to the end
    once, resumed = _runs(uninterrupted), _runs(out)
    assert resumed.keys() == once.keys()
    for key, r in resumed.items():
        a = {k: v for k, v in r.items() if k not in VOLATILE}
        b = {k: v for k, v in once[key].items() if k not in VOLATILE}
        assert a == b, key  # every loss, accuracy and validation loss bitwise


def test_cached_top_layers_give_the_full_models_label_logits(tmp_path: Path) -> None:
    ctx = pp.Context(pp.TINY, tmp_path, verbose=False)
    assert pp.check_top(ctx, "tiny_parity", n=6) < 1e-4
    data = ctx.data("tiny_parity")
    data["val"]["h"] = [h + 0.1 for h in data["val"]["h"]]  # a wrong cache is caught
    with pytest.raises(AssertionError):
        pp.check_top(ctx, "tiny_parity", n=6)


def test_time_limit_stops_cleanly_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "pp"
    pp.main(["run", *TINY_ARGS, "--out", str(out), "--time-limit", "0"])
    assert _runs(out) == {} and (out / "report.md").exists()  # stopped before the first run
    pp.main(["run", *TINY_ARGS, "--out", str(out), "--max-runs", "1"])
    assert len(_runs(out)) == 1


def test_report_builds_from_partial_results(tmp_path: Path) -> None:
    out = tmp_path / "pp"
    pp.main(["run", "--tiny", "--quiet", "--wait", "0.01", "--out", str(out), "--max-runs", "3"])
    text = (out / "report.md").read_text()
    assert "3 runs finished" in text and "| pending |" in text  # the 4th gate run is missing
    assert "Gate pending" in text and "Pre-registered decision: pending" in text
    assert (out / "val_curves.png").stat().st_size > 5_000


# ------------------------------------------------------------------ rules, fabricated results


def fake(
    task: str,
    method: str,
    lr: float,
    seed: int,
    val: float,
    *,
    loss: float = 0.6,
    majority: float = 0.5,
    test: float | None = None,
) -> dict[str, Any]:
    return {
        "key": pp.run_key(task, method, lr, seed),
        "task": task,
        "method": method,
        "lr": lr,
        "seed": seed,
        "best_val_acc": val,
        "best_val_loss": loss,
        "val_majority": majority,
        "test_majority": majority,
        "test_best": val if test is None else test,
        "test_final": val if test is None else test,
    }


def _add(runs: dict[str, dict[str, Any]], *rs: dict[str, Any]) -> None:
    for r in rs:
        runs[r["key"]] = r


D = pp.Design()


def test_lr_choice_follows_the_preregistered_rule() -> None:
    runs: dict[str, dict[str, Any]] = {}
    _add(runs, fake("winowhy", "lora", 5e-4, 0, 0.70), fake("winowhy", "lora", 1e-4, 0, 0.60))
    assert pp.lr_grid(runs, D, "winowhy", "lora") == ([1e-3], None)  # grid not done
    _add(runs, fake("winowhy", "lora", 1e-3, 0, 0.70, loss=0.5))  # ties 5e-4, lower val loss
    missing, lr = pp.lr_grid(runs, D, "winowhy", "lora")
    assert (missing, lr) == ([2e-3], None)  # 1e-3 won: 2e-3 is added before deciding
    _add(runs, fake("winowhy", "lora", 2e-3, 0, 0.65))
    assert pp.lr_grid(runs, D, "winowhy", "lora") == ([], 1e-3)
    _add(runs, fake("winowhy", "lora", 2e-3, 0, 0.72))
    assert pp.lr_grid(runs, D, "winowhy", "lora") == ([], 2e-3)
    # a full tie (accuracy and loss): the smaller LR; other seeds are ignored
    other: dict[str, dict[str, Any]] = {}
    _add(other, *(fake("strategyqa", "cola3", lr, 0, 0.6) for lr in D.lrs))
    _add(other, fake("strategyqa", "cola3", 1e-3, 1, 0.99))
    assert pp.lr_grid(other, D, "strategyqa", "cola3") == ([], 1e-4)


def _gate_runs(vals: dict[str, float], majority: float = 0.5) -> dict[str, dict[str, Any]]:
    runs: dict[str, dict[str, Any]] = {}
    for task, v in vals.items():
        _add(runs, fake(task, "lora", 5e-4, 0, v, majority=majority))
        _add(runs, *(fake(task, "lora", lr, 0, v - 0.1, majority=majority) for lr in (1e-3, 1e-4)))
    return runs


def test_gate_keeps_up_to_three_tasks_by_margin_and_skips_the_fifth() -> None:
    vals = {"epistemic_reasoning": 0.56, "presuppositions_as_nli": 0.70,
            "strategyqa": 0.96, "winowhy": 0.62}  # fmt: skip
    runs = _gate_runs(vals)
    g = pp.gate(runs, D)
    passes = {t: row["passes"] for t, row in g["table"].items()}
    # +6 passes, +20 passes, 96% is above the ceiling, +12 passes
    assert passes == {"epistemic_reasoning": True, "presuppositions_as_nli": True,
                      "strategyqa": False, "winowhy": True}  # fmt: skip
    assert g["decided"] and g["kept"] == [
        "presuppositions_as_nli",
        "winowhy",
        "epistemic_reasoning",
    ]
    assert not g["need_fifth"]
    todo = pp.next_runs(runs, D)
    assert {(s, m) for s, _, m, _, _ in todo} >= {("lr", "cola3"), ("primary", "lora")}
    assert not any(t == "bbc_news" for _, t, _, _, _ in todo)
    assert all(t in g["kept"] for _, t, _, _, _ in todo)
    # exactly at the margin passes; just under does not
    edge = pp.gate(_gate_runs({t: 0.55 for t in D.tasks}), D)
    assert all(edge["table"][t]["passes"] for t in D.tasks)
    under = pp.gate(_gate_runs({t: 0.549 for t in D.tasks}), D)
    assert not any(under["table"][t]["passes"] for t in D.tasks)


def test_gate_runs_the_fifth_candidate_only_when_fewer_than_three_pass() -> None:
    vals = {"epistemic_reasoning": 0.50, "presuppositions_as_nli": 0.70,
            "strategyqa": 0.52, "winowhy": 0.62}  # fmt: skip
    runs = _gate_runs(vals)
    g = pp.gate(runs, D)
    assert g["need_fifth"] and not g["decided"] and g["kept"] == []
    todo = pp.next_runs(runs, D)
    assert todo == [("gate", "bbc_news", "lora", lr, 0) for lr in D.lrs]  # nothing else yet
    runs.update(_gate_runs({"bbc_news": 0.80}, majority=0.23))
    g = pp.gate(runs, D)
    assert g["decided"] and g["kept"] == ["presuppositions_as_nli", "winowhy", "bbc_news"]
    none = pp.gate(_gate_runs({t: 0.5 for t in [*D.tasks, "bbc_news"]}), D)
    assert (
        none["decided"]
        and none["kept"] == []
        and pp.next_runs(_gate_runs({t: 0.5 for t in [*D.tasks, "bbc_news"]}), D) == []
    )  # no task passes: the experiment stops


def test_gate_waits_for_the_step_up_lr() -> None:
    runs = _gate_runs({t: 0.7 for t in D.tasks})
    _add(runs, fake("winowhy", "lora", 1e-3, 0, 0.8))  # 1e-3 now wins on winowhy
    g = pp.gate(runs, D)
    assert not g["decided"] and g["table"]["winowhy"] is None
    assert pp.next_runs(runs, D) == [("gate", "winowhy", "lora", 2e-3, 0)]


def _primary(diffs: dict[str, list[float]], seeds: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    """Gate and LR runs done for the tasks of ``diffs``; COLA-3 − LoRA per seed as given."""
    runs = _gate_runs({t: 0.7 for t in diffs} | {t: 0.5 for t in D.tasks if t not in diffs})
    for task, ds in diffs.items():
        _add(runs, *(fake(task, "cola3", lr, 0, 0.7 if lr == 5e-4 else 0.6) for lr in D.lrs))
        for seed, diff in zip(seeds, ds, strict=True):
            _add(runs, fake(task, "lora", 5e-4, seed, 0.7, test=0.70))
            _add(runs, fake(task, "cola3", 5e-4, seed, 0.7, test=0.70 + diff / 100))
    return runs


def test_decision_confirmed_refuted_or_extended() -> None:
    three = ["epistemic_reasoning", "presuppositions_as_nli", "winowhy"]
    up = [1.5, 2.0, 2.5, 1.8, 2.2, 2.0]
    runs = _primary({t: up for t in three}, D.primary_seeds)
    d = pp.decide(runs, D, three)
    assert d["verdict"] == "confirmed" and d["primary"]["pooled"]["mean"] == pytest.approx(2.0)
    runs = _primary({t: [x - 2.2 for x in up] for t in three}, D.primary_seeds)
    assert pp.decide(runs, D, three)["verdict"] == "refuted"  # mean -0.2, upper bound < 1.5
    # +1.3 pooled, wide: neither rule holds, so the extension seeds are scheduled
    noisy = [6.0, -4.0, 5.0, -3.0, 4.0, -0.2]
    runs = _primary({t: noisy for t in three}, D.primary_seeds)
    dec = pp.decide(runs, D, three)
    assert dec["verdict"] == "extend"
    ext = [r for r in pp.next_runs(runs, D) if r[0] == "extension"]
    assert {(t, m, s) for _, t, m, _, s in ext} == {
        (t, m, s) for t in three for m in pp.PRIMARY for s in D.extension_seeds
    }
    # positive pooled mean with the interval above 0, but on 1 of 3 tasks only: not confirmed
    runs = _primary({three[0]: [9.0] * 6, three[1]: [-0.5] * 5 + [-0.6],
                     three[2]: [-0.5] * 5 + [-0.4]}, D.primary_seeds)  # fmt: skip
    assert pp.decide(runs, D, three)["verdict"] != "confirmed"
    # pending until every seed of both methods is in
    partial = _primary({t: up[:5] for t in three}, D.primary_seeds[:5])
    assert pp.decide(partial, D, three)["verdict"] == "pending"


def test_pooled_interval_is_the_stratified_t_interval() -> None:
    runs = _primary({"winowhy": [1.0, 3.0], "strategyqa": [0.0, 4.0]}, (1, 2))
    res = pp.paired(runs, D, "cola3", "lora", (1, 2), ["winowhy", "strategyqa"])
    p = res["pooled"]
    # task means 2 and 2, variances 2 and 8, n = 2 each: se = sqrt(2/2 + 8/2) / 2, df = 2
    assert p["mean"] == pytest.approx(2.0)
    assert p["se"] == pytest.approx(5**0.5 / 2)
    assert p["ci95"] == pytest.approx(4.303 * 5**0.5 / 2)
    assert res["per_task"]["winowhy"]["ahead"] == 2


def test_report_builds_from_fabricated_partial_results(tmp_path: Path) -> None:
    three = ["epistemic_reasoning", "presuppositions_as_nli", "winowhy"]
    runs = _primary({t: [1.0, 2.0] for t in three}, (1, 2))
    (tmp_path / "runs").mkdir()
    for r in runs.values():
        r.update(design=D.to_json(), device="cpu", epochs=[{"val_acc": r["best_val_acc"]}] * 5)
        (tmp_path / "runs" / f"{r['key']}.json").write_text(json.dumps(r))
    text = pp.build_report(tmp_path, D, plots=True)
    # equal margins: the design's task order; strategyqa failed the gate
    assert "kept tasks: epistemic_reasoning, presuppositions_as_nli, winowhy" in text
    assert "| cola3 − lora | test_best | pooled | 6 | +1.50 |" in text
    assert "Pre-registered decision: pending" in text
    assert (tmp_path / "paired_differences.png").exists()


def test_splits_are_the_preregistered_ones_and_stratified() -> None:
    sizes = {"epistemic_reasoning": 2000, "presuppositions_as_nli": 735, "strategyqa": 2290,
             "winowhy": 2865, "bbc_news": 2225}  # fmt: skip
    got = {t: D.split_sizes(t, n) for t, n in sizes.items()}
    assert got == {"epistemic_reasoning": (1000, 500, 500),
                   "presuppositions_as_nli": (400, 100, 235), "strategyqa": (1000, 500, 790),
                   "winowhy": (1365, 500, 1000), "bbc_news": (1000, 500, 725)}  # fmt: skip
    labels = [0] * 700 + [1] * 250 + [2] * 50
    parts = pp.stratified_split(labels, (500, 300, 200), seed=3)
    assert [len(p) for p in parts] == [500, 300, 200]
    assert len({i for p in parts for i in p}) == 1000
    for p in parts:
        for k, share in ((0, 0.7), (1, 0.25), (2, 0.05)):
            assert abs(sum(labels[i] == k for i in p) - share * len(p)) <= 1.5
    with pytest.raises(ValueError, match="exceed"):
        pp.stratified_split(labels, (900, 200), seed=0)
