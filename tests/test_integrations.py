"""Training frameworks and what users deploy: HF Trainer, Accelerate, torch.amp, gradient
checkpointing, and Hugging Face checkpoints (``save_merged``, the ``save_pretrained`` guard)."""

from __future__ import annotations

import copy
import importlib
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from models import tiny_llama, tiny_opt
from safetensors import safe_open
from torch import nn

from chainopt import (
    ChainLoRAOptimizer,
    KnotRecord,
    ParametrizedCheckpointWarning,
    guard_save_pretrained,
    save_merged,
    saving_for_resume,
)

IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(9))


def _chain(model: nn.Module, **kw: Any) -> ChainLoRAOptimizer:
    kw = {"target_modules": ["q_proj", "v_proj"], "rank": 4, "alpha": 8, "knot_every": 3, **kw}
    return ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), **kw)


def _knot_steps(opt: ChainLoRAOptimizer) -> list[int]:
    steps: list[int] = []

    def record(_opt: ChainLoRAOptimizer, knot: KnotRecord) -> None:
        steps.append(knot.step)

    opt.register_knot_hook(record)
    return steps


def _batches(n: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (n, batch, 10), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _assert_same_optimizer(a: ChainLoRAOptimizer, b: ChainLoRAOptimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for i, state in sa["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb["state"][i][key])), key
    for key in ("optimizer_steps", "knots_tied"):
        assert sa["chainopt"][key] == sb["chainopt"][key]
    assert torch.equal(sa["chainopt"]["generator"], sb["chainopt"]["generator"])


# --- Hugging Face Trainer ---


class _Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int = 32) -> None:
        self.ids = torch.randint(0, 64, (n, 10), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out: Path, **kw: Any) -> Any:
    from transformers import TrainingArguments

    kw = {
        "max_steps": 6,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "save_strategy": "steps",
        "save_steps": 4,
        "logging_steps": 1,
        "seed": 1,
        **kw,
    }
    return TrainingArguments(
        output_dir=str(out), report_to="none", use_cpu=True, disable_tqdm=True, **kw
    )


def _llama_trainer(out: Path, callback: bool = True) -> tuple[nn.Module, ChainLoRAOptimizer, Any]:
    """The issue's form: Trainer(model, args, optimizers=(opt, scheduler))."""
    from transformers import Trainer, get_linear_schedule_with_warmup

    from chainopt.integrations.transformers import ChainLoRACallback

    model = tiny_llama()
    opt = _chain(model, seed=5)
    scheduler = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=6)
    trainer = Trainer(
        model=model,
        args=_args(out),
        train_dataset=_Tokens(),
        optimizers=(opt, scheduler),
        callbacks=[ChainLoRACallback()] if callback else [],
    )
    return model, opt, trainer


@pytest.mark.parametrize("callback", [True, False])
def test_trainer_knots_count_optimizer_steps_and_resume_mid_link_is_bitwise(
    tmp_path: Path, callback: bool
) -> None:
    from transformers import AutoModelForCausalLM, TrainerCallback

    model, opt, trainer = _llama_trainer(tmp_path / "straight", callback)
    knots = _knot_steps(opt)
    at_checkpoint: list[torch.Tensor] = []

    class LogitsAtStep4(TrainerCallback):  # what the checkpoint after step 4 should compute
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 4:
                at_checkpoint.append(_logits(model))

    trainer.add_callback(LogitsAtStep4())
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParametrizedCheckpointWarning)
        trainer.train()
    # 12 micro-batches, 6 optimizer steps: knots after optimizer steps 3 and 6.
    assert opt.optimizer_steps == trainer.state.global_step == 6
    assert knots == [3, 6]

    checkpoint = tmp_path / "straight" / "checkpoint-4"  # mid-link: one knot tied, one pending
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any(".parametrizations." in k for k in keys)  # a deployable model ...
    loaded, info = AutoModelForCausalLM.from_pretrained(checkpoint, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(_logits(loaded.eval()), at_checkpoint[0], rtol=1e-5, atol=1e-5)
    saved_opt = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert (
        "model.layers.0.self_attn.q_proj.parametrizations.weight.0.lora_A"
        in (saved_opt["chainopt"]["model"])
    )  # ... whose optimizer state carries the chain's own tensors

    resumed_model, resumed, trainer2 = _llama_trainer(tmp_path / "resumed", callback)
    trainer2.train(resume_from_checkpoint=str(checkpoint))

    assert resumed.optimizer_steps == 6 and resumed.knots_tied == 2
    assert [k.step for k in resumed.history.knots] == [3, 6]
    _assert_same_state(model, resumed_model)
    _assert_same_optimizer(opt, resumed)
    assert trainer2.lr_scheduler.get_last_lr() == trainer.lr_scheduler.get_last_lr()

    def log(t: Any) -> list[tuple[int, float, float]]:
        entries = [e for e in t.state.log_history if "loss" in e]
        return [(e["step"], e["loss"], e["learning_rate"]) for e in entries]

    assert log(trainer2) == log(trainer)  # steps 1-4 restored, 5-6 the same losses and lrs


def test_a_trainer_given_the_chained_model_but_not_the_chain_refuses_its_own_optimizer(
    tmp_path: Path,
) -> None:
    """``Trainer(model, args)`` without ``optimizers=`` builds an AdamW over the model's
    trainable parameters, the chain's factors: it trained the first link for the whole run, tied
    no knot, and ``save_model`` wrote that LoRA as if it were the chain, silently."""
    from transformers import Trainer

    model = tiny_llama()
    opt = _chain(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(
        model=model, args=_args(tmp_path, save_strategy="no"), train_dataset=_Tokens()
    )
    with pytest.raises(RuntimeError, match=r"AdamW is not the chain's optimizer.*optimizers="):
        trainer.train()
    assert opt.optimizer_steps == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5: activation_checkpointing
def test_create_chain_optimizer_follows_training_arguments(tmp_path: Path) -> None:
    from transformers import Trainer

    from chainopt.integrations.transformers import ChainLoRACallback, create_chain_optimizer

    model = tiny_opt()
    args = _args(
        tmp_path,
        max_steps=4,
        gradient_accumulation_steps=1,
        save_strategy="no",
        learning_rate=3e-3,
        weight_decay=0.05,
        adam_beta2=0.99,
        optim="adamw_torch",
        lr_scheduler_type="cosine",
        gradient_checkpointing=True,
    )
    opt = create_chain_optimizer(
        model, args, target_modules=["q_proj", "v_proj"], rank=2, knot_every=2, lora_bias=True
    )
    assert isinstance(opt.optimizer, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["lr"] == 3e-3
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith(("lora_A", "lora_B")) for p in decay["params"])
    assert all(names[id(p)].endswith("bias.0.delta") for p in no_decay["params"])

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Tokens(8),
        optimizers=(opt, None),  # the Trainer builds its scheduler from args over the chain
        callbacks=[ChainLoRACallback()],
    )
    trainer.train()
    assert model.is_gradient_checkpointing
    assert opt.optimizer_steps == 4 and opt.knots_tied == 2
    lrs = [e["learning_rate"] for e in trainer.state.log_history if "loss" in e]
    assert lrs == pytest.approx([3e-3 * (1 + math.cos(math.pi * s / 4)) / 2 for s in range(4)])
    assert [g["lr"] for g in opt.param_groups] == trainer.lr_scheduler.get_last_lr()
    expected = _logits(model)
    trainer.save_model(str(tmp_path / "final"))  # the script's last line deploys
    from transformers import AutoModelForCausalLM

    loaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "final", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(_logits(loaded.eval()), expected, rtol=1e-5, atol=1e-5)


def test_load_best_model_at_end_brings_the_chain_back_to_the_best_checkpoint(
    tmp_path: Path,
) -> None:
    from peft import PeftModel
    from transformers import Trainer

    from chainopt import export_peft_adapter
    from chainopt.integrations.transformers import ChainLoRACallback

    model = tiny_llama()
    opt = _chain(model)  # knots after steps 3 and 6
    args = _args(
        tmp_path,
        gradient_accumulation_steps=1,
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="first",
        greater_is_better=True,
    )
    trainer: Any = None

    def first(_: Any) -> dict[str, float]:  # makes checkpoint-2 the best one
        return {"first": float(trainer.state.global_step == 2)}

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Tokens(),
        eval_dataset=_Tokens(2),
        compute_metrics=first,
        optimizers=(opt, None),
        callbacks=[ChainLoRACallback()],
    )
    trainer.train()

    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    assert opt.optimizer_steps == 2 and opt.knots_tied == 0 and len(opt.history) == 0
    expected = _logits(model.eval())
    export_peft_adapter(opt, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(loaded), expected, rtol=1e-5, atol=1e-5)


def test_create_chain_optimizer_refuses_optimizers_that_build_their_own_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import Trainer

    from chainopt.integrations.transformers import create_chain_optimizer

    def galore_like(args: Any, model: Any = None) -> tuple[type, dict[str, Any]]:
        return torch.optim.AdamW, {"lr": 1e-3, "params": [{"params": []}]}

    monkeypatch.setattr(Trainer, "get_optimizer_cls_and_kwargs", staticmethod(galore_like))
    model = tiny_llama()
    with pytest.raises(ValueError, match="builds its own parameter groups"):
        create_chain_optimizer(model, _args(tmp_path), target_modules=["q_proj"])
    assert not any("parametrizations" in k for k in model.state_dict())


def test_chain_callback_refuses_a_trainer_without_a_chain(tmp_path: Path) -> None:
    from transformers import Trainer

    from chainopt.integrations.transformers import ChainLoRACallback

    trainer = Trainer(
        model=tiny_llama(),
        args=_args(tmp_path),
        train_dataset=_Tokens(),
        callbacks=[ChainLoRACallback()],
    )
    with pytest.raises(ValueError, match="not a ChainLoRAOptimizer"):
        trainer.train()


def test_the_trainer_integration_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "chainopt.integrations.transformers", raising=False)
    with pytest.raises(ImportError, match="pip install transformers"):
        importlib.import_module("chainopt.integrations.transformers")


# --- Accelerate ---


def _accelerated(
    model: nn.Module, opt: ChainLoRAOptimizer, ids: torch.Tensor, state: Path | None = None
) -> Any:
    """Train on ``ids`` (one micro-batch each) with Accelerate, accumulating 2; return it."""
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    loader = torch.utils.data.DataLoader([{"input_ids": b[0], "labels": b[0]} for b in ids])
    p_model, p_opt, p_loader = accelerator.prepare(model, opt, loader)
    assert p_opt.optimizer is opt
    if state is not None:
        accelerator.load_state(str(state))
    for batch in p_loader:
        with accelerator.accumulate(p_model):
            accelerator.backward(p_model(**batch).loss)
            p_opt.step()
            p_opt.zero_grad()
    return accelerator


@pytest.mark.usefixtures("accelerate_state")
def test_accelerate_prepare_and_accumulate_step_the_chain_once_per_optimizer_step() -> None:
    ids = _batches(8, batch=1)
    model = tiny_llama()
    opt = _chain(model, knot_every=2)
    knots = _knot_steps(opt)
    _accelerated(model, opt, ids)
    assert opt.optimizer_steps == 4 and knots == [2, 4]  # 8 micro-batches

    manual = tiny_llama()  # the same training, accumulated by hand
    manual_opt = _chain(manual, knot_every=2)
    for i, b in enumerate(ids):
        (manual(input_ids=b, labels=b).loss / 2).backward()
        if i % 2 == 1:
            manual_opt.step()
            manual_opt.zero_grad()
    _assert_same_state(model, manual)


@pytest.mark.usefixtures("accelerate_state")
def test_accelerate_save_state_mid_link_then_load_state_resumes_bitwise(tmp_path: Path) -> None:
    ids = _batches(12, batch=1)
    straight = tiny_llama()
    straight_opt = _chain(straight)  # knots after optimizer steps 3 and 6
    _accelerated(straight, straight_opt, ids)

    first = tiny_llama()
    first_opt = _chain(first)
    _accelerated(first, first_opt, ids[:8]).save_state(str(tmp_path))  # 4 steps: mid-link
    resumed = tiny_llama()
    resumed_opt = _chain(resumed)
    _accelerated(resumed, resumed_opt, ids[8:], state=tmp_path)

    assert resumed_opt.optimizer_steps == 6 and resumed_opt.knots_tied == 2
    _assert_same_state(straight, resumed)
    _assert_same_optimizer(straight_opt, resumed_opt)


# --- torch.amp ---


def test_bf16_autocast_trains_float32_factors_with_the_float32_gradient_direction() -> None:
    ids = _batches(4)
    grads = []
    for autocast in (False, True):
        model = tiny_llama()
        opt = _chain(model, knot_every=2)
        with torch.no_grad():
            for p in opt.factors():
                p.normal_(0, 0.1)  # B != 0: both factors get a gradient
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids[0], labels=ids[0]).loss
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in opt.factors()]))
        assert all(p.grad.dtype == torch.float32 for p in opt.factors())
    cosine = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cosine > 0.99

    model = tiny_llama()
    opt = _chain(model, knot_every=2)
    for b in ids:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=b, labels=b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert opt.knots_tied == 2 and torch.isfinite(loss)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp16_grad_scaler_skipped_steps_are_not_counted_and_tie_no_knot(
    dtype: torch.dtype,
) -> None:
    model = tiny_llama().to(dtype)
    opt = _chain(model, knot_every=2)  # factors are float32 for float16 weights
    knots = _knot_steps(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    counts = []
    for i, b in enumerate(_batches(6)):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(input_ids=b, labels=b).loss
        scaler.scale(loss).backward()
        if i in (1, 3):  # an overflow: the scaler skips the step and halves the scale
            opt.factors()[1].grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in opt.factors()]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if i in (1, 3):
            assert all(torch.equal(p, q) for p, q in zip(opt.factors(), before, strict=True))
        counts.append(opt.optimizer_steps)
    assert counts == [1, 1, 2, 2, 3, 4]
    assert knots == [2, 4] and opt.knots_tied == 2
    assert scaler.get_scale() == 2.0**6


# --- gradient checkpointing ---


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 renames the method
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("build", [tiny_llama, tiny_opt])
def test_gradient_checkpointing_trains_the_chain_bitwise_the_same(
    build: Any, reentrant: bool
) -> None:
    def train(checkpointing: bool) -> nn.Module:
        model = build().train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        opt = _chain(model, knot_every=2)
        for b in _batches(3):
            model(input_ids=b, labels=b).loss.backward()
            opt.step()
            opt.zero_grad()
        assert opt.knots_tied == 1
        return model

    _assert_same_state(train(False), train(True))


# --- what users deploy: Hugging Face checkpoints ---


@pytest.mark.parametrize("build", [tiny_llama, tiny_opt])  # OPT ties lm_head to the embeddings
def test_save_merged_loads_in_stock_from_pretrained_and_training_goes_on(
    tmp_path: Path, build: Any
) -> None:
    from transformers import AutoModelForCausalLM

    model = build()
    opt = _chain(model, knot_every=2)
    for b in _batches(3):  # a knot and a pending link
        model(input_ids=b, labels=b).loss.backward()
        opt.step()
        opt.zero_grad()
    expected = _logits(model)

    with warnings.catch_warnings():
        warnings.simplefilter("error", ParametrizedCheckpointWarning)
        assert save_merged(opt, tmp_path) == tmp_path
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    torch.testing.assert_close(_logits(loaded.eval()), expected, rtol=1e-5, atol=1e-5)

    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)  # model unchanged
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()  # and it keeps training: step 4 ties the second knot
    assert opt.knots_tied == 2


def test_save_merged_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    model = tiny_llama()
    opt = _chain(model)
    with pytest.raises(TypeError, match="do not pass state_dict"):
        save_merged(opt, tmp_path, state_dict={})
    with pytest.raises(TypeError, match="no save_pretrained"):
        save_merged(nn.Sequential(nn.Linear(2, 2)), tmp_path)
    assert not any(tmp_path.iterdir())


def test_save_pretrained_of_a_chained_model_writes_the_fine_tuned_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    opt = _chain(model, knot_every=2)
    for b in _batches(3):
        model(input_ids=b, labels=b).loss.backward()
        opt.step()
        opt.zero_grad()
    expected = _logits(model)
    assert guard_save_pretrained(model) and guard_save_pretrained(model)  # idempotent

    for name, kwargs in [("plain", {}), ("own", {"state_dict": model.state_dict()})]:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ParametrizedCheckpointWarning)
            model.save_pretrained(tmp_path / name, **kwargs)
        loaded, info = AutoModelForCausalLM.from_pretrained(
            tmp_path / name, output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"]
        torch.testing.assert_close(_logits(loaded.eval()), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)  # the model is unchanged

    foreign = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(ParametrizedCheckpointWarning, match="not the model's own"):
        model.save_pretrained(tmp_path / "foreign", state_dict=foreign)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParametrizedCheckpointWarning)
        with saving_for_resume(model):
            model.save_pretrained(tmp_path / "resume")  # parametrized keys, as asked
        with safe_open(str(tmp_path / "resume" / "model.safetensors"), "pt") as f:
            assert any(".parametrizations." in k for k in f.keys())  # noqa: SIM118
        clone = copy.deepcopy(model)
        assert clone.save_pretrained.__self__ is clone  # the copy's method saves the copy
        opt.merge_and_unload()
        model.save_pretrained(tmp_path / "unloaded")  # no links left: as the class saves


def test_a_chained_model_loads_a_plain_checkpoint_as_that_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    source = tiny_llama(seed=3)
    source.save_pretrained(tmp_path / "plain")
    model = tiny_llama()
    _chain(model)
    model.load_state_dict(AutoModelForCausalLM.from_pretrained(tmp_path / "plain").state_dict())
    torch.testing.assert_close(_logits(model), _logits(source.eval()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", [3, None, "model"])
def test_the_save_guards_refuse_what_is_not_a_module(model: Any) -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        guard_save_pretrained(model)
    with (
        pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"),
        saving_for_resume(model),
    ):
        pass


def test_resuming_a_save_only_model_checkpoint_warns_that_the_chain_starts_over(
    tmp_path: Path,
) -> None:
    from transformers import Trainer

    from chainopt import ChainLoRAWarning
    from chainopt.integrations.transformers import ChainLoRACallback

    def trainer(out: Path) -> tuple[ChainLoRAOptimizer, Any]:
        model = tiny_llama()
        opt = _chain(model, seed=5)
        args = _args(out, save_only_model=True)
        return opt, Trainer(model=model, args=args, train_dataset=_Tokens(),
                            optimizers=(opt, None), callbacks=[ChainLoRACallback()])  # fmt: skip

    _, first = trainer(tmp_path / "a")
    first.train()
    checkpoint = tmp_path / "a" / "checkpoint-4"
    assert not (checkpoint / "optimizer.pt").exists()
    opt, second = trainer(tmp_path / "b")
    with pytest.warns(ChainLoRAWarning, match="resumed at step 4 from a checkpoint without"):
        second.train(resume_from_checkpoint=str(checkpoint))
    assert opt.optimizer_steps == 2  # steps 5 and 6, counted from 0 again


# --- KnotWarmup as the Trainer's scheduler ---


def test_trainer_with_knot_warmup_logs_the_warmed_rate_and_resumes_it_bitwise(
    tmp_path: Path,
) -> None:
    """``Trainer(optimizers=(opt, KnotWarmup(...)))``: the logged rate is the warmed one and
    ``scheduler.pt`` (read back with ``weights_only=True``) resumes it."""
    from transformers import Trainer, get_linear_schedule_with_warmup

    from chainopt import KnotWarmup

    def run(out: Path) -> tuple[nn.Module, ChainLoRAOptimizer, Any]:
        model = tiny_llama()
        opt = _chain(model, seed=5)  # knots after optimizer steps 3 and 6
        inner = get_linear_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=6)
        sched = KnotWarmup(inner, opt, warmup_steps=2)
        trainer = Trainer(
            model=model, args=_args(out), train_dataset=_Tokens(), optimizers=(opt, sched)
        )
        return model, opt, trainer

    model, opt, trainer = run(tmp_path / "straight")
    trainer.train()
    logged = [e["learning_rate"] for e in trainer.state.log_history if "loss" in e]
    # the rate in effect during each step: linear decay, halved the step after each knot
    linear = [1e-2 * (1 - s / 6) for s in range(6)]
    assert logged == [
        pytest.approx(a * b) for a, b in zip(linear, [1, 1, 1, 0.5, 1, 1], strict=True)
    ]
    resumed_model, resumed, trainer2 = run(tmp_path / "resumed")
    trainer2.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-4"))
    _assert_same_state(model, resumed_model)
    _assert_same_optimizer(opt, resumed)
    assert trainer2.lr_scheduler.state_dict() == trainer.lr_scheduler.state_dict()
    assert [e for e in trainer2.state.log_history if "loss" in e] == [
        e for e in trainer.state.log_history if "loss" in e
    ]


def test_trainer_refuses_knot_warmup_over_reduce_lr_on_plateau_at_the_first_step(
    tmp_path: Path,
) -> None:
    """The Trainer steps a scheduler that is not a ``ReduceLROnPlateau`` with no metric: the
    warm-up says so before anything changes (the model trained one step, the rate did not)."""
    from transformers import Trainer

    from chainopt import KnotWarmup

    model = tiny_llama()
    opt = _chain(model, seed=5)
    sched = KnotWarmup(torch.optim.lr_scheduler.ReduceLROnPlateau(opt), opt, warmup_steps=2)
    trainer = Trainer(
        model=model, args=_args(tmp_path), train_dataset=_Tokens(), optimizers=(opt, sched)
    )
    with pytest.raises(TypeError, match="the HF Trainer steps its scheduler without metrics"):
        trainer.train()
    assert opt.optimizer_steps == 1 and sched.last_epoch == 0
    assert [g["lr"] for g in opt.param_groups] == [1e-2] * len(opt.param_groups)
