"""Layer kinds: each builder finds what it attached, and a new kind is one builder and no more.

The toy kind here keeps its own forward and adds the link's term from a forward hook, with the
link a child module (as PEFT's own LoRA layers do): registering its builder is all it takes for
the optimizer, the knot, the guard and ``merge_and_unload`` to chain it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import chainopt._layers as layers
from chainopt import ChainLoRAOptimizer, merge_and_unload, merged_state_dict
from chainopt._attach import attach, lora_parametrization
from chainopt._quant_backends import backend_for
from chainopt._record import LinkSpec, ModuleRecord
from chainopt.lora import LoRAParametrization


class ToyLinear(nn.Module):
    """A layer no built-in kind adapts: ``x·Wᵀ + b`` with its own class."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / math.sqrt(in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def _lora_term(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
    link = module.toy_link
    return out + nn.functional.linear(nn.functional.linear(args[0], link.lora_A), link.lora_B) * (
        link.scale
    )


class ToyBuilder:
    """The toy kind: a child ``toy_link`` and a forward hook (removed by :meth:`detach`)."""

    def claims(self, module: nn.Module) -> bool:
        return isinstance(module, ToyLinear)

    def attach(
        self,
        name: str,
        module: nn.Module,
        spec: LinkSpec,
        generator: torch.Generator,
        master: Tensor | None = None,
    ) -> ModuleRecord:
        link = LoRAParametrization(module.out_features, module.in_features, spec.ranks[0],
                                   spec.alpha, ranks=spec.ranks)  # fmt: skip
        link.reset_parameters(generator)
        module.add_module("toy_link", link)
        module.__dict__["_toy_hook"] = module.register_forward_hook(_lora_term)
        return self.find(name, module)  # type: ignore[return-value]

    def find(self, name: str, module: nn.Module) -> ModuleRecord | None:
        link = module._modules.get("toy_link")
        if not isinstance(link, LoRAParametrization):
            return None
        return ModuleRecord(name, module, link, None, module.weight, module.bias, None,
                            "toy_link.", self)  # fmt: skip

    def detach(self, module: nn.Module) -> None:
        module._modules.pop("toy_link", None)
        module.__dict__.pop("_toy_hook").remove()


@pytest.fixture
def toy_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layers, "BUILDERS", (ToyBuilder(), *layers.BUILDERS))


@pytest.mark.usefixtures("toy_kind")
def test_a_new_layer_kind_is_one_builder() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ToyLinear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    w0 = model[0].weight.detach().clone()
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             target_modules=["0", "2"], rank=2, knot_every=100)  # fmt: skip
    assert [type(r.builder) for r in opt.chain.records] == [ToyBuilder, layers.DenseBuilder]
    assert not model[0].weight.requires_grad
    for _ in range(3):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    link = model[0].toy_link
    update = link.delta()
    assert update.abs().sum() > 0  # the link trained
    with torch.no_grad():
        before = model(x)
    opt.tie_knot()
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[0].weight.detach(), w0 + update, rtol=0, atol=1e-6)
    assert not link.lora_B.any()  # restarted
    model.load_state_dict(model.state_dict())  # the load guard takes the kind's own keys
    with torch.no_grad():
        link.lora_B.normal_()
    merged = merged_state_dict(model)
    assert sorted(merged) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    merge_and_unload(model)
    torch.testing.assert_close(dict(model.state_dict()), merged, rtol=0, atol=0)
    assert "toy_link" not in model[0]._modules and not model[0]._forward_hooks
    assert type(model[2]) is nn.Linear


def test_each_builder_finds_only_what_it_attached() -> None:
    lin = nn.Linear(4, 3)
    assert layers.builder_for(lin) is layers.BUILDERS[2] and backend_for(lin) is None
    assert layers.find_adapted(nn.Sequential(lin)) == []
    link = attach(lin, rank=2, alpha=2.0)
    [record] = layers.find_adapted(nn.Sequential(lin))
    assert (record.name, record.link, record.builder) == ("0", link, layers.BUILDERS[2])
    assert layers.BUILDERS[1].find("0", lin) is None  # the 4-bit kind does not claim it
    record.unload()
    assert lora_parametrization(lin) is None and type(lin) is nn.Linear
    with pytest.raises(ValueError, match="carries no chainopt link"):
        layers.record_of("fc", lin)
