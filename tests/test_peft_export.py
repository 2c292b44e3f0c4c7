"""The chain as one PEFT LoRA adapter: exact round trips through PEFT, compression, refusals."""

from __future__ import annotations

import copy
import json
import re
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
from models import mlp, tiny_llama, tiny_opt
from safetensors.torch import load_file
from torch import nn

from chainopt import (
    ChainLoRAOptimizer,
    NonFiniteUpdateError,
    export_peft_adapter,
    merge_and_unload,
    peft_adapter_state_dict,
)
from chainopt._attach import lora_parametrization

IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(9))


def _train_lm(model: nn.Module, steps: int, **kw: Any) -> ChainLoRAOptimizer:
    kw = {
        "target_modules": ["q_proj", "v_proj"],
        "rank": 4,
        "alpha": 8,
        "knot_every": 2,
        "keep_history": True,
        **kw,
    }
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=2e-2), **kw)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _peft(base: nn.Module, path: Path) -> nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(base, path).eval()


def _dense_updates(opt: ChainLoRAOptimizer, w0: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole chain's update per module, densely: (current adapted weight) - W₀."""
    out = {}
    for name, module in opt.adapted_modules():
        out[name] = module.weight.detach().double() - w0[name].double()
    return out


# Two sources of the merged links: the kept history, or the original weights (``base``): the
# same adapter either way, exact from the history, exact to float32 rounding from the base.
SOURCES = ["history", "base"]


def _source(source: str, base: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """(optimizer kwargs, export kwargs) for a source."""
    if source == "history":
        return {"keep_history": True}, {}
    return {"keep_history": False}, {"base": base}


@pytest.mark.parametrize("source", SOURCES)
def test_exact_adapter_on_the_original_base_reproduces_the_fine_tuned_llama(
    tmp_path: Path, source: str
) -> None:
    model = tiny_llama()
    train_kw, export_kw = _source(source, tiny_llama())
    opt = _train_lm(model, 5, trainable_modules=["lm_head"], **train_kw)  # 2 knots + pending
    expected = _logits(model.eval())

    report = export_peft_adapter(opt, tmp_path, **export_kw)

    assert report.rank == 12
    assert report.relative_error == 0.0 if source == "history" else report.relative_error < 1e-6
    assert report.chain_ranks == dict.fromkeys(opt.config.modules, 12)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == config["lora_alpha"] == 12
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["modules_to_save"] == ["lm_head"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    assert tensors[f"{key}.lora_A.weight"].shape == (12, 32)
    assert tensors[f"{key}.lora_B.weight"].shape == (32, 12)
    assert tensors[f"{key}.lora_A.weight"].dtype == torch.float32
    assert "base_model.model.lm_head.weight" in tensors

    loaded = _peft(tiny_llama(), tmp_path)  # the original base weights (same seed)
    torch.testing.assert_close(_logits(loaded), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", SOURCES)
def test_exact_adapter_of_some_layers_of_opt(tmp_path: Path, source: str) -> None:
    model = tiny_opt()
    targets = re.compile(r".*layers\.0\.self_attn\.(q|v)_proj")  # layer 0 only
    train_kw, export_kw = _source(source, tiny_opt())
    opt = _train_lm(model, 4, target_modules=targets, **train_kw)  # 2 knots; new link still 0
    expected = _logits(model.eval())

    report = export_peft_adapter(opt, tmp_path, **export_kw)

    assert report.rank == 8
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    names = ["model.decoder.layers.0.self_attn.q_proj", "model.decoder.layers.0.self_attn.v_proj"]
    assert sorted(config["target_modules"].split("|")) == [re.escape(n) for n in names]
    loaded = _peft(tiny_opt(), tmp_path)
    torch.testing.assert_close(_logits(loaded), expected, rtol=1e-5, atol=1e-5)


def test_compressed_adapter_is_the_best_rank_k_update_and_reports_its_error(
    tmp_path: Path,
) -> None:
    model = mlp(width=12)
    opt = ChainLoRAOptimizer(
        model,
        torch.optim.AdamW(model.parameters(), lr=5e-2),
        target_modules=["0", "2"],
        rank=2,
        knot_every=2,
        keep_history=True,
    )
    w0 = {n: m.parametrizations.weight.original.detach().clone() for n, m in opt.adapted_modules()}
    gen = torch.Generator().manual_seed(1)
    for _ in range(7):  # three knots and a pending link: chain rank 8
        model(torch.randn(8, 12, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    dense = _dense_updates(opt, w0)

    report = export_peft_adapter(opt, tmp_path, rank=3)

    assert report.rank == 3 and report.chain_ranks == {"0": 8, "2": 8}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    left = total = 0.0
    for name, delta in dense.items():
        b = tensors[f"base_model.model.{name}.lora_B.weight"].double()
        a = tensors[f"base_model.model.{name}.lora_A.weight"].double()
        assert b.shape == (12, 3) and a.shape == (3, 12)
        s = torch.linalg.svdvals(delta)
        best = (s[3:].square().sum() / s.square().sum()).sqrt().item()  # Eckart-Young
        error = ((delta - b @ a).norm() / delta.norm()).item()
        assert error == pytest.approx(best, rel=1e-3, abs=1e-6)
        assert report.relative_errors[name] == pytest.approx(best, rel=1e-3, abs=1e-6)
        left, total = left + (delta - b @ a).norm().item() ** 2, total + delta.norm().item() ** 2
    assert 0 < report.relative_error == pytest.approx((left / total) ** 0.5, rel=1e-3)
    assert report.max_relative_error == max(report.relative_errors.values())

    exact = export_peft_adapter(opt, tmp_path / "big", rank=10)  # k above the chain rank: exact
    assert exact.rank == 10 and exact.max_relative_error == 0.0
    tensors = load_file(tmp_path / "big" / "adapter_model.safetensors")
    for name, delta in dense.items():
        b = tensors[f"base_model.model.{name}.lora_B.weight"].double()
        a = tensors[f"base_model.model.{name}.lora_A.weight"].double()
        assert not b[:, 8:].any() and not a[8:].any()  # zero padding
        torch.testing.assert_close(b @ a, delta, rtol=1e-5, atol=1e-6)


def test_modules_with_shorter_chains_are_padded_to_one_rank(tmp_path: Path) -> None:
    model = mlp(width=12)
    opt = ChainLoRAOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        target_modules=["0", "2"],
        rank=2,
        knot_every=1,
        non_finite="skip",
        keep_history=True,
    )
    w0 = {n: m.parametrizations.weight.original.detach().clone() for n, m in opt.adapted_modules()}
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        model(torch.randn(8, 12, generator=gen)).square().mean().backward()
        if step == 1:  # module "2" drops this link unmerged
            with torch.no_grad():
                lora_parametrization(model[2]).lora_B[0, 0] = float("nan")
        with pytest.warns(RuntimeWarning, match="non-finite") if step == 1 else nullcontext():
            opt.step()
        opt.zero_grad()
    dense = _dense_updates(opt, w0)

    report = export_peft_adapter(opt, tmp_path)

    assert report.chain_ranks == {"0": 6, "2": 4} and report.rank == 6
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for name, delta in dense.items():
        b = tensors[f"base_model.model.{name}.lora_B.weight"].double()
        a = tensors[f"base_model.model.{name}.lora_A.weight"].double()
        assert b.shape == (12, 6)
        torch.testing.assert_close(b @ a, delta, rtol=1e-5, atol=1e-6)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["0", "2"]
    assert config["task_type"] is None  # not a Hugging Face model class


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("steps", [2, 7])  # before any knot; after two knots, mid-link
def test_lora_bias_exports_lora_b_bias(tmp_path: Path, steps: int, source: str) -> None:
    model = tiny_opt()
    train_kw, export_kw = _source(source, tiny_opt())
    opt = _train_lm(model, steps, lora_bias=True, knot_every=3, **train_kw)
    assert opt.knots_tied == steps // 3
    expected = _logits(model.eval())

    export_peft_adapter(opt, tmp_path, **export_kw)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["lora_bias"] is True
    loaded = _peft(tiny_opt(), tmp_path)
    torch.testing.assert_close(_logits(loaded), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora_bias", [False, True])
def test_without_history_or_base_a_chain_with_knots_is_refused(
    tmp_path: Path, lora_bias: bool
) -> None:
    model = tiny_opt()
    opt = _train_lm(model, 3, keep_history=False, lora_bias=lora_bias)  # one knot tied
    with pytest.raises(ValueError, match=r"keep_history=False .* Pass base="):
        export_peft_adapter(opt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("unload", ["optimizer", "function"])
def test_after_merge_and_unload_it_needs_the_base_and_then_is_exact(
    tmp_path: Path, unload: str
) -> None:
    model = tiny_llama()
    opt = _train_lm(model, 3)  # one knot, then a pending link that merge_and_unload merges
    if unload == "optimizer":
        opt.merge_and_unload()
    else:  # chainopt.merge_and_unload(model) behind the optimizer's back: the same export
        merge_and_unload(model)
    expected = _logits(model.eval())
    with pytest.raises(ValueError, match=r"merge_and_unload.* Pass base="):
        export_peft_adapter(opt, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    report = export_peft_adapter(opt, tmp_path / "out", base=tiny_llama().state_dict())

    assert report.rank == 8 and report.relative_error < 1e-6
    loaded = _peft(tiny_llama(), tmp_path / "out")
    torch.testing.assert_close(_logits(loaded), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unload", ["optimizer", "function"])
def test_a_chain_on_weights_an_earlier_chain_merged_needs_the_base_and_then_is_exact(
    tmp_path: Path, unload: str
) -> None:
    """A second chain on a model whose first chain was merged and unloaded keeps only its own
    links in its history: an adapter of them on the original base would miss the first chain
    (the export wrote exactly that before). It needs ``base=`` now, and is then exact: rank 16
    (both chains' Σr) where the optimizer unloaded the first one, every rank where
    ``chainopt.merge_and_unload`` did it behind the optimizer's back (its rank is not known)."""
    model = tiny_llama()
    first = _train_lm(model, 3)
    first.merge_and_unload() if unload == "optimizer" else merge_and_unload(model)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[key], tiny_llama().state_dict()[key])
    opt = _train_lm(model, 3)
    expected = _logits(model.eval())
    with pytest.raises(ValueError, match=r"earlier chain .* Pass base="):
        export_peft_adapter(opt, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    report = export_peft_adapter(opt, tmp_path / "out", base=tiny_llama().state_dict())

    weight = tiny_llama().get_submodule("model.layers.0.self_attn.q_proj").weight
    assert report.rank == (16 if unload == "optimizer" else min(weight.shape))
    assert report.relative_error < 1e-6
    loaded = _peft(tiny_llama(), tmp_path / "out")
    torch.testing.assert_close(_logits(loaded), expected, rtol=1e-5, atol=1e-5)


def test_a_resumed_second_chain_still_knows_the_first_one_under_its_weights(
    tmp_path: Path,
) -> None:
    """The second chain's state, resumed in a fresh process (a fresh model from the original
    base, then the model's and the optimizer's state), carries what the first chain merged: the
    export asks for ``base=`` and writes both chains exactly, as before the resume."""
    import copy

    model = tiny_llama()
    _train_lm(model, 3).merge_and_unload()
    second = _train_lm(model, 3)
    model_state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(second.state_dict())
    expected = _logits(model.eval())

    fresh = tiny_llama()
    resumed = _train_lm(fresh, 0)
    fresh.load_state_dict(model_state)
    resumed.load_state_dict(opt_state)
    torch.testing.assert_close(_logits(fresh.eval()), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"earlier chain .* Pass base="):
        export_peft_adapter(resumed, tmp_path / "out")
    report = export_peft_adapter(resumed, tmp_path / "out", base=tiny_llama().state_dict())
    assert report.rank == 16 and report.relative_error < 1e-6
    torch.testing.assert_close(_logits(_peft(tiny_llama(), tmp_path / "out")), expected,
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_compressed_from_base_equals_compressed_from_history(tmp_path: Path) -> None:
    model = tiny_llama()
    opt = _train_lm(model, 7)  # three knots and a pending link: chain rank 16
    from_history = export_peft_adapter(opt, tmp_path / "h", rank=5)
    from_base = export_peft_adapter(opt, tmp_path / "b", rank=5, base=tiny_llama())  # same seed

    h = load_file(tmp_path / "h" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert (
        from_base.chain_ranks == from_history.chain_ranks == dict.fromkeys(opt.config.modules, 16)
    )
    for name in opt.config.modules:
        key = f"base_model.model.{name}"
        best = h[f"{key}.lora_B.weight"].double() @ h[f"{key}.lora_A.weight"].double()
        got = b[f"{key}.lora_B.weight"].double() @ b[f"{key}.lora_A.weight"].double()
        torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-6)
        assert from_base.relative_errors[name] == pytest.approx(
            from_history.relative_errors[name], rel=1e-4
        )


@pytest.mark.parametrize(
    ("base", "error", "match"),
    [
        ({}, ValueError, "base has no tensor 'model.layers.0.self_attn.q_proj.weight'"),
        (
            {"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)},
            ValueError,
            r"base\['model.layers.0.self_attn.q_proj.weight'\] has shape \(3, 3\)",
        ),
        ("weights.bin", TypeError, "base must be an nn.Module or a state dict, got str"),
    ],
)
def test_a_bad_base_is_refused_before_anything_is_written(
    tmp_path: Path, base: Any, error: type[Exception], match: str
) -> None:
    model = tiny_llama()
    opt = _train_lm(model, 3, keep_history=False)
    with pytest.raises(error, match=match):
        export_peft_adapter(opt, tmp_path / "out", base=base)
    assert not (tmp_path / "out").exists()


def test_the_chained_model_itself_is_not_a_base(tmp_path: Path) -> None:
    model = tiny_llama()
    opt = _train_lm(model, 3, keep_history=False)
    with pytest.raises(ValueError, match="base carries chainopt links"):
        export_peft_adapter(opt, tmp_path / "out", base=model)
    assert not (tmp_path / "out").exists()


def test_without_history_a_chain_with_no_knot_yet_still_exports(tmp_path: Path) -> None:
    model = tiny_llama()
    opt = _train_lm(model, 1, keep_history=False)
    assert export_peft_adapter(opt, tmp_path).rank == 4


@pytest.mark.parametrize("how", ["requires_grad_", "trained"])
def test_a_weight_under_a_link_that_requires_grad_is_refused_before_anything_is_written(
    tmp_path: Path, how: str
) -> None:
    """``model.requires_grad_(True)`` after wrapping put every module in ``modules_to_save``
    beside its own LoRA layer, and a bias under a link trained through ``add_param_group`` was
    written the same way: both adapters failed to load in PEFT (no module targeted; a KeyError).
    Both are refused, naming the tensors, and nothing is written."""
    model = tiny_llama()
    opt = _train_lm(model, 3, keep_history=True)
    if how == "requires_grad_":
        model.requires_grad_(True)
        hot = r"model\.layers\.0\.self_attn\.q_proj\.weight"
    else:
        weight = model.get_submodule("model.layers.1.self_attn.v_proj").parametrizations.weight
        opt.add_param_group({"params": [weight.original]})
        weight.original.requires_grad_(True)
        hot = r"model\.layers\.1\.self_attn\.v_proj\.weight"
    for export in (
        lambda: export_peft_adapter(opt, tmp_path / "out"),
        lambda: peft_adapter_state_dict(opt),
    ):
        with pytest.raises(ValueError, match=rf"requires grad \(\['{hot}'.*nothing was written"):
            export()
    assert not (tmp_path / "out").exists()


def test_without_safetensors_it_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = mlp()
    opt = ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_modules=["0"], knot_every=2
    )
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install safetensors"):
        export_peft_adapter(opt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rank", [0, -1, 2.0, True])
def test_bad_rank_is_refused_before_anything_is_written(tmp_path: Path, rank: Any) -> None:
    model = mlp()
    opt = ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_modules=["0"], knot_every=2
    )
    with pytest.raises(ValueError, match="rank must be None"):
        export_peft_adapter(opt, tmp_path / "out", rank=rank)
    assert not (tmp_path / "out").exists()


def test_a_plain_optimizer_is_refused(tmp_path: Path) -> None:
    model = mlp()
    with pytest.raises(TypeError, match="ChainLoRAOptimizer"):
        export_peft_adapter(torch.optim.SGD(model.parameters(), lr=0.1), tmp_path)  # type: ignore[arg-type]


def test_an_adapter_with_nan_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    model = mlp()
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             target_modules=["0"], rank=2, knot_every=9)  # fmt: skip
    with torch.no_grad():
        lora_parametrization(model[0]).lora_B[0, 0] = float("nan")  # type: ignore[union-attr]
    with pytest.raises(NonFiniteUpdateError, match="refusing to export the adapter"):
        export_peft_adapter(opt, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_an_adapter_with_a_nan_trained_module_is_refused_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    """A module trained as it is (``modules_to_save``) that took a NaN step (a link dropped by
    ``non_finite="skip"`` at that knot) was written into the adapter. Refused now."""
    model = mlp()
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             target_modules=["0"], trainable_modules=["4"], rank=2, knot_every=9,
                             keep_history=True)  # fmt: skip
    with torch.no_grad():
        model[4].bias[0] = float("inf")
    with pytest.raises(NonFiniteUpdateError, match=r"non-finite \['base_model.model.4.bias'\]"):
        export_peft_adapter(opt, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    with pytest.raises(NonFiniteUpdateError, match=r"4\.bias"):
        peft_adapter_state_dict(opt)
    with torch.no_grad():
        model[4].bias[0] = 0.0
    assert export_peft_adapter(opt, tmp_path / "adapter").rank == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base": 3}, "base must be an nn.Module or a state dict, got int"),
        ({"base": {"x"}}, "base must be an nn.Module or a state dict, got set"),
        ({"base_model_name_or_path": 7}, "base_model_name_or_path must be a str or None"),
    ],
)
def test_export_refuses_bad_bases_and_writes_nothing(
    tmp_path: Path, kwargs: dict[str, Any], match: str
) -> None:
    opt = _train_lm(tiny_opt(), 3, keep_history=True)
    with pytest.raises(TypeError, match=match):
        export_peft_adapter(opt, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_an_export_that_runs_out_of_disk_leaves_the_previous_adapter_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adapter's files are written as every chainopt file: atomically, 0600 until whole."""
    import errno
    import os

    import chainopt._atomic as atomic

    model = tiny_llama()
    opt = _train_lm(model, 3)
    export_peft_adapter(opt, tmp_path / "out")
    files = sorted((tmp_path / "out").iterdir())
    before = {p.name: p.read_bytes() for p in files}
    for p in files:
        os.chmod(p, 0o600)
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()  # the re-export differs: a torn one could not pass for the old
    real_open = open

    class Full:
        def __init__(self, f: Any) -> None:
            self._f = f

        def write(self, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str) -> Any:
            return getattr(self._f, name)

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self._f.close()

    monkeypatch.setattr(atomic, "open", lambda *a, **k: Full(real_open(*a, **k)), raising=False)
    with pytest.raises(OSError, match="No space left"):
        export_peft_adapter(opt, tmp_path / "out")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    export_peft_adapter(opt, tmp_path / "out")
    assert all((os.stat(p).st_mode & 0o777) == 0o600 for p in files)


def _mamba(family: str) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    if family == "mamba2":
        cfg = transformers.Mamba2Config(
            vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1, expand=2,
            conv_kernel=2, num_heads=4, head_dim=8, n_groups=1, chunk_size=8,
        )  # fmt: skip
        return transformers.Mamba2ForCausalLM(cfg)
    config_class = {"mamba": "MambaConfig", "falcon_mamba": "FalconMambaConfig"}[family]
    model_class = {"mamba": "MambaForCausalLM", "falcon_mamba": "FalconMambaForCausalLM"}[family]
    cfg = getattr(transformers, config_class)(
        vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1, expand=2, conv_kernel=2
    )
    return getattr(transformers, model_class)(cfg)  # type: ignore[no-any-return]


@pytest.mark.parametrize("peft_installed", [True, False])
@pytest.mark.parametrize("family", ["mamba", "falcon_mamba", "mamba2"])
def test_an_adapter_peft_would_refuse_to_load_is_not_written(
    tmp_path: Path, family: str, peft_installed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PEFT refuses LoRA on a Mamba-family ``out_proj``: the export used to write it anyway."""
    peft = pytest.importorskip("peft")
    model = _mamba(family)
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters()), target_modules=["in_proj", "out_proj"],
        rank=2, knot_every=2, keep_history=True,
    )  # fmt: skip
    if not peft_installed:  # then PEFT's per-family rule, as chainopt copies it
        monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ValueError, match=r"PEFT .*out_proj.*nothing was written"):
        export_peft_adapter(opt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    with pytest.raises(ValueError, match="out_proj"):  # what PEFT's loader says, for the record
        peft.inject_adapter_in_model(
            peft.LoraConfig(r=2, target_modules=["out_proj"]), _mamba(family)
        )

    model = _mamba(family)  # in_proj alone: written, and PEFT loads it as the model
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), target_modules=["in_proj"],
        rank=2, knot_every=2, keep_history=True,
    )  # fmt: skip
    for _ in range(3):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    export_peft_adapter(opt, tmp_path / "ok")
    loaded = _peft(_mamba(family), tmp_path / "ok")
    torch.testing.assert_close(_logits(loaded), _logits(model.eval()), rtol=1e-4, atol=1e-4)


def test_a_model_class_the_check_cannot_rebuild_is_checked_by_peft_rules_only(
    tmp_path: Path,
) -> None:
    """The check builds a meta instance from the config; a class that takes more than its config
    is no reason to refuse: PEFT's per-family rules apply by name, and this one is fine."""
    from transformers import LlamaForCausalLM

    class Extra(LlamaForCausalLM):  # type: ignore[misc]
        def __init__(self, config: Any, extra: int) -> None:
            super().__init__(config)
            self.extra = extra

    model = Extra(tiny_llama().config, extra=3)
    opt = _train_lm(model, 3)
    export_peft_adapter(opt, tmp_path / "out")
    loaded = _peft(tiny_llama(), tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").exists() and loaded is not None


@pytest.mark.parametrize("trained", ["transformer.wte", "lm_head"])
def test_a_trained_tied_embedding_is_saved_with_its_tied_head(tmp_path: Path, trained: str) -> None:
    """``trainable_modules=["wte"]`` on a GPT-2 with tied embeddings: the adapter saved only
    ``wte`` as ``modules_to_save``, PEFT gave it its own copy, and the ``lm_head`` kept the
    original weight on the base: logits 1.37 away, no error. Every module holding the trained
    Parameter is saved now (with ``ensure_weight_tying``), and the adapter is the model."""
    pytest.importorskip("peft")
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2() -> nn.Module:
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)
        return GPT2LMHeadModel(cfg).eval()

    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    opt = _train_lm(model, 5, target_modules=["c_attn"], trainable_modules=[trained])
    export_peft_adapter(opt, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head", "transformer.wte"]
    served = _peft(gpt2(), tmp_path)
    torch.testing.assert_close(_logits(served), _logits(model), rtol=1e-5, atol=1e-5)


def test_a_chain_on_a_module_held_at_two_places_is_not_exported(tmp_path: Path) -> None:
    """PEFT puts its LoRA layer at one of the module's places (``"0"`` of ``Sequential(lin,
    act, lin)``): the adapter served by ``PeftModel.from_pretrained`` applied the chain to the
    first use only and computed another function, without a word."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(8, 2))
    original = copy.deepcopy(model)
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             target_modules=["2"], rank=2, knot_every=2,
                             keep_history=True)  # fmt: skip
    with torch.no_grad():
        lin.parametrizations.weight[0].lora_B.normal_()
    for unload in (False, True):
        if unload:
            opt.merge_and_unload()
        with pytest.raises(ValueError, match=r"holds at several places \(\['0', '2'\]\)"):
            export_peft_adapter(opt, tmp_path / "adapter", base=original if unload else None)
        assert not (tmp_path / "adapter").exists()


def test_the_adapter_in_memory_is_what_export_writes_and_peft_loads_it(tmp_path: Path) -> None:
    """``peft_adapter_state_dict``: the tensors and config ``export_peft_adapter`` writes,
    bitwise, which ``set_peft_model_state_dict`` loads onto the original base to the trained
    logits (where PEFT's own ``get_peft_model_state_dict`` cannot see a plain chain at all)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from chainopt import peft_adapter_state_dict

    torch.manual_seed(0)
    model = tiny_llama()
    original = copy.deepcopy(model)
    opt = _train_lm(model, 5, trainable_modules=["lm_head"])
    state, config = peft_adapter_state_dict(opt)
    export_peft_adapter(opt, tmp_path)
    written = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(state) == sorted(written)
    assert all(torch.equal(state[k], written[k]) for k in state)
    assert config == json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 12 and config["modules_to_save"] == ["lm_head"]
    fields = ("r", "lora_alpha", "target_modules", "modules_to_save")
    served = get_peft_model(original, LoraConfig(**{k: config[k] for k in fields})).eval()
    set_peft_model_state_dict(served, state)
    model.eval()
    torch.testing.assert_close(_logits(served), _logits(model), rtol=1e-5, atol=1e-5)


def test_the_adapter_in_memory_refuses_what_export_refuses() -> None:
    from chainopt import peft_adapter_state_dict

    model = mlp()
    opt = ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_modules=["0"], rank=2,
        knot_every=1,
    )  # fmt: skip
    with torch.no_grad():
        lora_parametrization(model[0]).lora_B.normal_()
    opt.tie_knot()  # without history: the merged link is gone
    with pytest.raises(ValueError, match="keep_history=False"):
        peft_adapter_state_dict(opt)
    with pytest.raises(TypeError, match="chain must be a ChainLoRAOptimizer"):
        peft_adapter_state_dict(model)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank must be"):
        peft_adapter_state_dict(opt, rank=0)
