"""Lightning with a chain over 4-bit layers built in ``configure_optimizers()``: resuming with
``ChainLoRACheckpoint`` is bitwise, merged (dense weights in ``"state_dict"``) or not.

Lightning loads the checkpoint into the module before ``configure_optimizers()`` builds the
chain; an unchained ``Linear4bit`` can load neither a merged dense weight nor its link and
quantization state, so the callback sets them aside for the chained module's own load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("lightning")
bnb = pytest.importorskip("bitsandbytes")

import test_lightning as L  # noqa: E402

from chainopt import ChainLoRAOptimizer  # noqa: E402
from chainopt.integrations.lightning import ChainLoRACheckpoint  # noqa: E402


def _4bit(linear: nn.Linear) -> nn.Module:
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=True,
                              compute_dtype=torch.float32, quant_type="nf4")  # fmt: skip
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False,
                                     quant_type="nf4")  # fmt: skip
    layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to("cpu")


class Quantized(L.Tiny):
    """``net.0`` and ``net.2`` are 4-bit; the chain adapts ``net.0`` only (``net.2`` stays an
    unadapted 4-bit layer), ``net.4`` is trained whole."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net[0] = _4bit(nn.Linear(8, 64))
        self.net[2] = _4bit(nn.Linear(64, 64))
        self.net[4] = nn.Linear(64, 4)

    def build_chain(self) -> ChainLoRAOptimizer:
        return ChainLoRAOptimizer(self, torch.optim.AdamW(self.parameters(), lr=1e-2),
                                  target_modules=["net.0"], trainable_modules=["net.4"], rank=2,
                                  knot_every=L.KNOT_EVERY)  # fmt: skip


@pytest.mark.parametrize("merged", [True, False])
def test_a_4bit_chain_built_in_configure_optimizers_resumes_bitwise(
    tmp_path: Path, merged: bool
) -> None:
    reference = L.fit(tmp_path, Quantized(), ChainLoRACheckpoint(merged=merged))
    resumed = L.fit(tmp_path / "again", Quantized(), ChainLoRACheckpoint(merged=merged),
                    ckpt_path=L.mid(tmp_path))  # fmt: skip
    L.assert_resumed(reference, resumed)
    ref, res = L.chain_of(reference), L.chain_of(resumed)
    for a, b in zip(ref.chain.records, res.chain.records, strict=True):
        assert torch.equal(a.quant.master, b.quant.master)  # type: ignore[union-attr]
