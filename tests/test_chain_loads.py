"""Loads into a live chain that replace its state with a plain (merged) checkpoint.

After such a load the model is the checkpoint's model (every link restarted at zero), but the
chain's history describes links merged into weights the model no longer holds: an adapter
exported from it would be another model. So the export then needs ``base=`` (it factorises
``W - W0`` exactly), and the HF ``Trainer``'s ``load_best_model_at_end`` without the chain's
optimizer state (``save_only_model=True``) says so.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from models import tiny_llama
from torch import nn

import chainopt
from chainopt import ChainLoRAOptimizer, ChainLoRAWarning
from chainopt.peft_export import export_peft_adapter

IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(9))


def _chain(model: nn.Module, **kw: Any) -> ChainLoRAOptimizer:
    kw = {"target_modules": ["q_proj", "v_proj"], "rank": 4, "alpha": 8, "knot_every": 3,
          "keep_history": True, "seed": 5, **kw}  # fmt: skip
    return ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), **kw)


def _train(model: nn.Module, opt: ChainLoRAOptimizer, steps: int) -> None:
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 10), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _served(path: Path) -> torch.Tensor:
    from peft import PeftModel

    return _logits(PeftModel.from_pretrained(tiny_llama(), path).eval())


def test_a_plain_checkpoint_loaded_into_a_chain_with_history_makes_the_export_need_base(
    tmp_path: Path,
) -> None:
    pytest.importorskip("peft")
    model = tiny_llama()
    opt = _chain(model)
    _train(model, opt, 4)  # a knot and a pending link
    best = chainopt.merged_state_dict(model)
    expected = _logits(model)
    chainopt.save_checkpoint(tmp_path / "c.pt", model, opt)
    _train(model, opt, 4)  # another knot
    model.load_state_dict(best)  # what load_best_model_at_end does with a merged checkpoint
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="plain \\(merged\\) checkpoint"):
        export_peft_adapter(opt, tmp_path / "stale")
    assert not (tmp_path / "stale").exists()
    export_peft_adapter(opt, tmp_path / "exact", base=tiny_llama())  # W - W0, factorised
    torch.testing.assert_close(_served(tmp_path / "exact"), expected, rtol=1e-4, atol=1e-4)
    # the chain's own state loaded whole again: the history describes the model again
    chainopt.load_checkpoint(tmp_path / "c.pt", model, opt)
    export_peft_adapter(opt, tmp_path / "history")
    torch.testing.assert_close(_served(tmp_path / "history"), expected, rtol=1e-4, atol=1e-4)


def test_a_plain_load_into_a_fresh_chain_also_needs_base_then_exports_the_update(
    tmp_path: Path,
) -> None:
    """A chain built on one model that then loads another's weights: links trained since are
    relative to the loaded weights, not to the model it was built on; the export asks."""
    pytest.importorskip("peft")
    model = tiny_llama(seed=1)
    opt = _chain(model)
    model.load_state_dict(tiny_llama().state_dict())
    _train(model, opt, 4)
    with pytest.raises(ValueError, match="plain \\(merged\\) checkpoint"):
        export_peft_adapter(opt, tmp_path / "a")
    export_peft_adapter(opt, tmp_path / "a", base=tiny_llama())
    torch.testing.assert_close(_served(tmp_path / "a"), _logits(model), rtol=1e-4, atol=1e-4)


def _best_trainer(out: Path, **kw: Any) -> tuple[nn.Module, ChainLoRAOptimizer, Any, list[Any]]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from chainopt.integrations.transformers import ChainLoRACallback

    class _Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        ids = torch.randint(0, 64, (24, 10), generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    model = tiny_llama()
    opt = _chain(model)  # knots after steps 3 and 6
    args = TrainingArguments(
        output_dir=str(out), max_steps=6, per_device_train_batch_size=2, save_strategy="steps",
        save_steps=2, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
        metric_for_best_model="first", greater_is_better=True, report_to="none", use_cpu=True,
        disable_tqdm=True, **kw,
    )  # fmt: skip
    at_step: list[Any] = []
    trainer: Any = None

    class Record(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 2:
                at_step.append(_logits(model))

    def first(_: Any) -> dict[str, float]:  # makes checkpoint-2 the best one
        return {"first": float(trainer.state.global_step == 2)}

    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), eval_dataset=_Tokens(),
                      compute_metrics=first, optimizers=(opt, None),
                      callbacks=[ChainLoRACallback(), Record()])  # fmt: skip
    return model, opt, trainer, at_step


def test_load_best_model_at_end_with_save_only_model_warns_and_the_export_needs_base(
    tmp_path: Path,
) -> None:
    pytest.importorskip("peft")
    model, opt, trainer, at_step = _best_trainer(tmp_path / "out", save_only_model=True)
    with pytest.warns(ChainLoRAWarning, match="holds no optimizer.pt"):
        trainer.train()
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    torch.testing.assert_close(_logits(model), at_step[0], rtol=1e-5, atol=1e-5)  # the best
    with pytest.raises(ValueError, match="plain \\(merged\\) checkpoint"):
        export_peft_adapter(opt, tmp_path / "adapter")
    export_peft_adapter(opt, tmp_path / "adapter", base=tiny_llama())
    torch.testing.assert_close(_served(tmp_path / "adapter"), at_step[0], rtol=1e-4, atol=1e-4)


def test_load_best_model_at_end_with_the_optimizer_state_restores_the_chain_silently(
    tmp_path: Path,
) -> None:
    pytest.importorskip("peft")
    _, opt, trainer, at_step = _best_trainer(tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChainLoRAWarning)
        trainer.train()
    assert opt.optimizer_steps == 2 and opt.knots_tied == 0 and len(opt.history) == 0
    export_peft_adapter(opt, tmp_path / "adapter")  # from the history: it describes the model
    torch.testing.assert_close(_served(tmp_path / "adapter"), at_step[0], rtol=1e-4, atol=1e-4)


def test_unloading_after_a_plain_load_leaves_no_load_hook_or_flag() -> None:
    model = tiny_llama()
    opt = _chain(model)
    _train(model, opt, 2)
    model.load_state_dict(chainopt.merged_state_dict(model))
    chainopt.merge_and_unload(model)
    assert [k for k in vars(model) if "chainopt" in k] == ["_chainopt_base_merged"]  # what it holds
    assert not model._load_state_dict_pre_hooks and not model._load_state_dict_post_hooks


@pytest.mark.parametrize("order", ["model first", "optimizer first", "model only", "stepped"])
def test_loading_the_chain_own_keys_keeps_the_history_only_with_its_optimizer_state(
    tmp_path: Path, order: str
) -> None:
    """The chain's own keys loaded into a live chain replace its tensors; without the optimizer
    state saved with them (model only, or with a step between) the history no longer describes
    the model, and the export asks for ``base``."""
    pytest.importorskip("peft")
    model = tiny_llama()
    opt = _chain(model)
    _train(model, opt, 4)
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = copy.deepcopy(opt.state_dict())
    expected = _logits(model)
    _train(model, opt, 4)
    if order == "model first":
        model.load_state_dict(model_state)
        opt.load_state_dict(opt_state)
    elif order == "optimizer first":
        opt.load_state_dict(opt_state)
        model.load_state_dict(model_state)
    elif order == "model only":
        model.load_state_dict(model_state)
    else:
        opt.load_state_dict(opt_state)
        _train(model, opt, 1)
        model.load_state_dict(model_state)
    if order in ("model only", "stepped"):
        with pytest.raises(ValueError, match="plain \\(merged\\) checkpoint"):
            export_peft_adapter(opt, tmp_path / "a")
        return
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)
    export_peft_adapter(opt, tmp_path / "a")
    torch.testing.assert_close(_served(tmp_path / "a"), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("order", ["optimizer first", "model first", "optimizer only"])
def test_the_optimizer_state_of_one_run_with_the_model_of_another_makes_the_export_need_base(
    tmp_path: Path, order: str
) -> None:
    """Run A's optimizer state beside run B's model (both chains of the same config, from the
    same base): loading both cleared the stale mark, and the adapter written from A's history
    was 0.21 away from the model. The state now carries a fingerprint of the frozen weights it
    was saved with; a model whose weights differ (B's, or the fresh base when only the optimizer
    state is loaded) makes the export ask for ``base``, and with it the export is exact. The
    pair of one run (the test above) still exports from the history."""
    pytest.importorskip("peft")
    runs = []
    for lr in (1e-2, 3e-2):  # run A, run B
        model = tiny_llama()
        opt = _chain(model)
        opt.param_groups[0]["lr"] = lr
        _train(model, opt, 4)  # a knot after step 3
        runs.append((copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())))
    (_, opt_a), (model_b, _) = runs
    model = tiny_llama()
    opt = _chain(model)
    if order == "optimizer first":
        opt.load_state_dict(opt_a)
        model.load_state_dict(model_b)
    elif order == "model first":
        model.load_state_dict(model_b)
        opt.load_state_dict(opt_a)
    else:
        opt.load_state_dict(opt_a)
    expected = _logits(model)
    with pytest.raises(ValueError, match=r"another run's .* Pass base="):
        export_peft_adapter(opt, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    export_peft_adapter(opt, tmp_path / "a", base=tiny_llama())
    torch.testing.assert_close(_served(tmp_path / "a"), expected, rtol=1e-4, atol=1e-4)


def test_a_chained_peft_model_with_another_runs_optimizer_state_refuses_its_save(
    tmp_path: Path,
) -> None:
    """The same on a chained PeftModel, whose save_pretrained writes the chain from its history."""
    states = []
    for lr in (1e-2, 3e-2):
        model, opt = _peft_chain()
        opt.param_groups[0]["lr"] = lr
        _train(model, opt, 4)
        states.append((copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())))
    model, opt = _peft_chain()
    opt.load_state_dict(states[0][1])
    model.load_state_dict(states[1][0])
    with pytest.raises(ValueError, match="no longer describes"):
        model.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a").exists()
    opt.load_state_dict(states[1][1])  # B's own optimizer state: the pair of one run
    model.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("part", ["one module, factors and weight", "one weight only"])
def test_a_partial_load_of_frozen_weights_makes_the_export_need_base(
    tmp_path: Path, part: str
) -> None:
    """``load_state_dict(..., strict=False)`` of some of the chain's own keys from an earlier
    state (or just a frozen weight) replaces weights the history describes: the export must not
    write the history over the original base (it was 0.066 and 0.84 away on an MLP)."""
    pytest.importorskip("peft")
    model = tiny_llama()
    opt = _chain(model)
    _train(model, opt, 2)
    early = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, opt, 2)  # a knot after step 3
    stem = "model.layers.0.self_attn.q_proj."
    keys = [k for k in early if k.startswith(stem)]
    if part == "one weight only":
        keys = [f"{stem}parametrizations.weight.original"]
    model.load_state_dict({k: early[k] for k in keys}, strict=False)
    with pytest.raises(ValueError, match="plain \\(merged\\) checkpoint"):
        export_peft_adapter(opt, tmp_path / "stale")
    assert not (tmp_path / "stale").exists()
    export_peft_adapter(opt, tmp_path / "exact", base=tiny_llama())  # W - W0, factorised
    torch.testing.assert_close(_served(tmp_path / "exact"), _logits(model), rtol=1e-4, atol=1e-4)


def test_a_partial_load_of_factors_only_keeps_the_history() -> None:
    """One module's factors loaded into the link under way leave the weights the history
    describes: no mark."""
    pytest.importorskip("peft")
    model = tiny_llama()
    opt = _chain(model)
    _train(model, opt, 4)
    stem = "model.layers.0.self_attn.q_proj.parametrizations.weight.0.lora_"
    factors = {k: torch.randn_like(v) for k, v in model.state_dict().items() if stem in k}
    assert len(factors) == 2
    model.load_state_dict(factors, strict=False)
    assert not chainopt._load_guard.loaded_plain_weights(model)


def _peft_chain() -> tuple[nn.Module, ChainLoRAOptimizer]:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=3, seed=5
    )
    return model, opt


@pytest.mark.parametrize("order", ["model only", "optimizer first", "model first"])
def test_a_chained_peft_model_loading_an_earlier_state_saves_only_with_its_optimizer_state(
    tmp_path: Path, order: str
) -> None:
    """A chained PeftModel's own earlier state dict, loaded model-only after a knot, put base
    weights under the adapter that the history no longer describes: ``save_pretrained`` wrote
    an adapter 0.093 away (MLP) from the model. Now it refuses, nothing written; with the
    optimizer state saved beside the model state it writes the model exactly."""
    from peft import PeftModel

    model, opt = _peft_chain()
    _train(model, opt, 2)
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = copy.deepcopy(opt.state_dict())
    expected = _logits(model)
    _train(model, opt, 2)  # a knot after step 3
    if order == "optimizer first":
        opt.load_state_dict(opt_state)
    model.load_state_dict(model_state)
    if order == "model first":
        opt.load_state_dict(opt_state)
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)
    if order == "model only":
        with pytest.raises(ValueError, match="no longer describes"):
            model.save_pretrained(tmp_path / "a")
        assert not (tmp_path / "a").exists()
        return
    model.save_pretrained(tmp_path / "a")
    served = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    torch.testing.assert_close(_logits(served), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("peft", [False, True])
def test_an_assigning_load_is_refused_before_anything_changes(peft: bool) -> None:
    """``load_state_dict(sd, assign=True)`` replaced the chain's Parameters by the state dict's
    tensors: the optimizer kept stepping the old ones (3 steps moved the model by 0.0), then the
    knot refused with a message about DeepSpeed. Refused now, naming ``assign``."""
    model, opt = _peft_chain() if peft else (tiny_llama(), None)
    opt = opt if opt is not None else _chain(model)
    _train(model, opt, 2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="assign=True"):
        model.load_state_dict(state, assign=True)
    assert all(p is params[n] for n, p in model.named_parameters())
    before = _logits(model)
    _train(model, opt, 1)
    assert not torch.equal(_logits(model), before)


@pytest.mark.parametrize("strict", [True, False])
def test_a_load_into_a_module_of_the_chain_is_refused_whole(strict: bool) -> None:
    """``model.model.load_state_dict(backbone)`` bypassed the chained model's load guard: with
    ``strict=False`` the adapted layers' plain weights were skipped silently (logits 0.53 from
    the backbone loaded), with ``strict=True`` torch raised after loading every other layer.
    Refused now before anything loads; the way the message gives loads it exactly."""
    model, other = tiny_llama(), tiny_llama(seed=1)
    opt = _chain(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    backbone = other.model.state_dict()
    with pytest.raises(ValueError, match="a module of a chained model"):
        model.model.load_state_dict(backbone, strict=strict)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    q_proj = model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="a module of a chained model"):
        q_proj.load_state_dict(other.model.layers[0].self_attn.q_proj.state_dict(), strict=False)
    model.model.load_state_dict({"norm.weight": backbone["norm.weight"]}, strict=False)  # no link
    model.lm_head.load_state_dict(other.lm_head.state_dict())
    model.load_state_dict({f"model.{k}": v for k, v in backbone.items()}, strict=False)
    torch.testing.assert_close(_logits(model), _logits(other), rtol=1e-6, atol=1e-6)
    assert chainopt._load_guard.loaded_plain_weights(model)
    _train(model, opt, 1)
    chainopt.merge_and_unload(model)
    assert not [m for m in model.modules() if m._load_state_dict_pre_hooks]
