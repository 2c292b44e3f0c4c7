"""Every deploy save another library offers writes the fine-tuned model (merged plain keys).

diffusers' ``save_pretrained`` (which takes no ``state_dict=``), a diffusers pipeline, Accelerate's
``save_model``, ``push_to_hub``, and ``save_pretrained(state_dict=...)`` with the caller's own
selection; resume saves (``Accelerator.save_state``, ``model.state_dict()``) keep the chain's keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from models import tiny_llama
from safetensors.torch import load_file
from torch import nn

import chainopt
from chainopt import (
    ChainLoRAOptimizer,
    merged_state_dict,
    save_merged,
    saving_for_resume,
    saving_merged,
)

IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(9))


def _trained_llama() -> tuple[nn.Module, ChainLoRAOptimizer]:
    model = tiny_llama()
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=2e-2),
        target_modules=["q_proj", "v_proj"], rank=4, knot_every=2,
    )  # fmt: skip
    for _ in range(3):  # a knot, then a pending link
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _tiny_unet() -> Any:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
        attention_head_dim=2, norm_num_groups=4,
    )  # fmt: skip


def _unet_out(unet: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x, enc = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 3, 8, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([3]), enc).sample  # type: ignore[no-any-return]


@pytest.mark.parametrize("how", ["save_pretrained", "save_merged", "pipeline"])
def test_a_chained_diffusers_unet_saves_the_fine_tuned_model(tmp_path: Path, how: str) -> None:
    """diffusers' save_pretrained takes no state_dict=: the merged one used to be dropped and the
    reloaded UNet re-initialised the adapted weights (NaN outputs here)."""
    diffusers = pytest.importorskip("diffusers")
    unet = _tiny_unet()
    opt = ChainLoRAOptimizer(
        unet, torch.optim.AdamW(unet.parameters(), lr=1e-2),
        target_modules=["to_q", "to_k", "to_v"], rank=2, knot_every=2,
    )  # fmt: skip
    for _ in range(3):
        gen = torch.Generator().manual_seed(opt.optimizer_steps)
        x, enc = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 3, 8, generator=gen)
        unet(x, torch.tensor([3]), enc).sample.square().mean().backward()
        opt.step()
        opt.zero_grad()
    expected = _unet_out(unet)
    if how == "save_pretrained":
        unet.save_pretrained(tmp_path)
        folder = tmp_path
    elif how == "save_merged":
        save_merged(opt, tmp_path)
        folder = tmp_path
    else:

        class Tiny(diffusers.DiffusionPipeline):  # type: ignore[misc, name-defined]
            def __init__(self, unet: nn.Module, scheduler: Any) -> None:
                super().__init__()
                self.register_modules(unet=unet, scheduler=scheduler)

        Tiny(unet, diffusers.DDPMScheduler()).save_pretrained(tmp_path)
        folder = tmp_path / "unet"
    saved = load_file(next(folder.glob("*.safetensors")))
    assert not any(".parametrizations." in k for k in saved)
    assert sorted(saved) == sorted(merged_state_dict(unet))
    loaded = diffusers.UNet2DConditionModel.from_pretrained(folder)
    torch.testing.assert_close(_unet_out(loaded), expected, rtol=1e-5, atol=1e-5)
    assert any(".parametrizations." in k for k in unet.state_dict())  # resume keys unchanged


def test_accelerate_save_model_writes_the_fine_tuned_model_and_save_state_the_chain(
    tmp_path: Path,
) -> None:
    """Accelerate's save_model reads model.state_dict() itself: it used to write the chain's
    keys, and from_pretrained re-initialised the adapted weights (logits off by 0.56)."""
    accelerate = pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    model, opt = _trained_llama()
    accelerator = accelerate.Accelerator(cpu=True)
    prepared, _ = accelerator.prepare(model, opt)
    expected = _logits(model)
    accelerator.save_model(prepared, tmp_path / "deploy")
    model.config.save_pretrained(tmp_path / "deploy")
    loaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "deploy", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(_logits(loaded.eval()), expected, rtol=1e-5, atol=1e-5)
    accelerator.save_state(str(tmp_path / "state"))  # resume: the chain's own keys
    resumed = load_file(tmp_path / "state" / "model.safetensors")
    assert any(".parametrizations." in k for k in resumed)
    assert any(".parametrizations." in k for k in model.state_dict())


def test_save_pretrained_honours_the_callers_own_state_dict(tmp_path: Path) -> None:
    """The caller's selection and values are written; only the chain's groups become merged
    plain entries (before: merged_state_dict(model) was written whatever was passed)."""
    model, _opt = _trained_llama()
    own = model.state_dict()
    given = {k: v for k, v in own.items() if not k.startswith("model.layers.1.")}
    given["model.norm.weight"] = torch.full_like(own["model.norm.weight"], 2.0)
    model.save_pretrained(tmp_path, state_dict=given)
    saved = load_file(tmp_path / "model.safetensors")
    merged = merged_state_dict(model)
    expected_keys = {k for k in merged if not k.startswith("model.layers.1.")}
    assert set(saved) == expected_keys  # untied lm_head: every selected entry is written
    assert torch.equal(saved["model.norm.weight"], given["model.norm.weight"])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(saved[q], merged[q])


def test_saving_merged_is_what_state_dict_gives_inside_and_nothing_else() -> None:
    model, opt = _trained_llama()
    outside = model.state_dict()
    with saving_merged(model):
        inside = model.state_dict()
        with saving_for_resume(model):
            assert model.state_dict().keys() == outside.keys()
        wrapped = nn.ModuleDict({"inner": model}).state_dict()  # under a parent: its prefix
    merged = merged_state_dict(model)
    assert list(inside) == list(merged)
    assert all(torch.equal(inside[k], merged[k]) for k in merged)
    assert list(wrapped) == [f"inner.{k}" for k in merged]
    assert model.state_dict().keys() == outside.keys()
    hooks = len(model._state_dict_hooks)
    opt.merge_and_unload()
    assert len(model._state_dict_hooks) == hooks - 1  # an unloaded model is the plain model
    assert not [k for k in vars(model) if k.startswith("_chainopt_state")]


def test_push_to_hub_goes_through_the_merged_save_pretrained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline: the hub calls are replaced; what would be uploaded is the fine-tuned model."""
    import shutil
    from types import SimpleNamespace

    import transformers.utils.hub as hub
    from transformers import AutoModelForCausalLM

    model, _opt = _trained_llama()
    expected = _logits(model)
    api = SimpleNamespace(create_repo=lambda repo_id, **_: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(hub, "hf_api", lambda: api)
    monkeypatch.setattr(
        hub, "create_and_tag_model_card", lambda *a, **k: SimpleNamespace(save=lambda p: None)
    )

    def upload(folder: str, *args: Any, **kwargs: Any) -> None:
        shutil.copytree(folder, tmp_path / "uploaded")

    monkeypatch.setattr(model, "_upload_modified_files", upload)
    model.push_to_hub("someone/tiny")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "uploaded")
    torch.testing.assert_close(_logits(loaded.eval()), expected, rtol=1e-5, atol=1e-5)


def test_the_state_dict_hook_survives_a_deep_copy_and_acts_on_the_copy() -> None:
    import copy

    model, _opt = _trained_llama()
    clone = copy.deepcopy(model)
    with saving_merged(clone):
        keys = list(clone.state_dict())
    assert keys == list(merged_state_dict(clone))
    chainopt.merge_and_unload(clone)
    assert any(".parametrizations." in k for k in model.state_dict())


def test_save_pretrained_of_a_model_holding_the_chained_one_writes_the_fine_tuned_model(
    tmp_path: Path,
) -> None:
    """A chain on ``model.model`` (the decoder): the outer model's class ``save_pretrained`` read
    ``state_dict()`` and wrote the chain's keys; from_pretrained re-initialised the weights."""
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    opt = ChainLoRAOptimizer(
        model.model, torch.optim.AdamW(model.model.parameters(), lr=2e-2),
        target_modules=["q_proj", "v_proj"], rank=4, knot_every=2,
    )  # fmt: skip
    for _ in range(3):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert not any(".parametrizations." in k for k in saved)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(_logits(loaded.eval()), expected, rtol=1e-5, atol=1e-5)
    assert any(".parametrizations." in k for k in model.state_dict())  # outside: the chain's


def test_a_trainer_checkpoint_of_a_chain_on_a_submodule_resumes_bitwise(tmp_path: Path) -> None:
    """The outer model's save_pretrained writes merged keys; the optimizer state then carries
    the chain's own tensors, so resume_from_checkpoint is still bitwise."""
    from test_integrations import _args, _assert_same_optimizer, _assert_same_state, _Tokens
    from transformers import Trainer

    def build(out: Path) -> tuple[nn.Module, ChainLoRAOptimizer, Any]:
        model = tiny_llama()
        opt = ChainLoRAOptimizer(
            model.model, torch.optim.AdamW(model.model.parameters(), lr=2e-2),
            target_modules=["q_proj", "v_proj"], rank=4, knot_every=3, seed=5,
        )  # fmt: skip
        trainer = Trainer(
            model=model, args=_args(out), train_dataset=_Tokens(), optimizers=(opt, None)
        )
        return model, opt, trainer

    model, opt, trainer = build(tmp_path / "straight")
    trainer.train()
    checkpoint = tmp_path / "straight" / "checkpoint-4"
    assert not any(".parametrizations." in k for k in load_file(checkpoint / "model.safetensors"))
    resumed_model, resumed, trainer2 = build(tmp_path / "resumed")
    trainer2.train(resume_from_checkpoint=str(checkpoint))
    assert (resumed.optimizer_steps, resumed.knots_tied) == (6, 2)
    _assert_same_state(model, resumed_model)
    _assert_same_optimizer(opt, resumed)
