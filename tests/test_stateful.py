"""A state machine over step / knot / save-load, checked against a plain dense reference.

The reference is COLA written out by hand: a frozen dense ``W``, factors ``A``, ``B``, the same
torch optimizer over ``[A, B]``, and knots as ``W += s·B·A; A ~ U(±1/√in); B = 0; state = {}``.
"""

from __future__ import annotations

import io
import math

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import nn

from chainopt import ChainLoRAOptimizer
from chainopt.lora import lora_parametrization

IN, OUT = 7, 5

FACTORIES = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1),
    "adam": lambda p: torch.optim.Adam(p, lr=0.02),
}


class Reference:
    """COLA on one Linear, spelled out densely."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor, rank: int, alpha: float, seed: int, opt: str
    ) -> None:
        self.w = weight.clone()
        self.b = bias.clone()
        self.scale = alpha / rank
        self.gen = torch.Generator().manual_seed(seed)
        self.a = torch.zeros(rank, IN, requires_grad=True)
        self.bf = torch.zeros(OUT, rank, requires_grad=True)
        self.opt = FACTORIES[opt]([self.a, self.bf])
        self.new_link()

    def new_link(self) -> None:
        bound = 1 / math.sqrt(IN)
        with torch.no_grad():
            self.a.copy_(torch.empty(self.a.shape).uniform_(-bound, bound, generator=self.gen))
            self.bf.zero_()
        self.opt.state.clear()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.w + self.scale * self.bf @ self.a).T + self.b

    def knot(self) -> None:
        with torch.no_grad():
            self.w += self.scale * self.bf @ self.a
        self.new_link()


class ChainMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.data = torch.Generator().manual_seed(0)

    @initialize(
        rank=st.integers(1, 5),
        alpha=st.sampled_from([1.0, 4.0, 16.0]),
        every=st.integers(1, 6),
        opt=st.sampled_from(sorted(FACTORIES)),
        seed=st.integers(0, 1000),
    )
    def setup(self, rank: int, alpha: float, every: int, opt: str, seed: int) -> None:
        self.kwargs = {"rank": rank, "alpha": alpha, "knot_every": every, "seed": seed}
        self.opt_name = opt
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(IN, OUT))
        self.ref = Reference(
            self.model[0].weight.detach(), self.model[0].bias.detach(), rank, alpha, seed, opt
        )
        self.chain = self._build(self.model)
        self.every = every

    def _build(self, model: nn.Module) -> ChainLoRAOptimizer:
        return ChainLoRAOptimizer(
            model, FACTORIES[self.opt_name], target_modules=["0"], **self.kwargs
        )

    @precondition(lambda self: hasattr(self, "chain"))
    @rule()
    def step(self) -> None:
        x, y = torch.randn(6, IN, generator=self.data), torch.randn(6, OUT, generator=self.data)
        nn.functional.mse_loss(self.model(x), y).backward()
        self.chain.step()
        self.chain.zero_grad()
        nn.functional.mse_loss(self.ref(x), y).backward()
        self.ref.opt.step()
        self.ref.opt.zero_grad()
        if self.chain.optimizer_steps % self.every == 0:
            self.ref.knot()
            link = lora_parametrization(self.model[0])
            assert torch.count_nonzero(link.lora_B) == 0
            assert link.lora_A not in self.chain.state and link.lora_B not in self.chain.state

    @precondition(lambda self: hasattr(self, "chain"))
    @rule()
    def knot(self) -> None:
        self.chain.tie_knot()
        self.ref.knot()

    @precondition(lambda self: hasattr(self, "chain"))
    @rule()
    def save_and_load(self) -> None:
        buf = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "opt": self.chain.state_dict()}, buf)
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        model = nn.Sequential(nn.Linear(IN, OUT))
        chain = self._build(model)
        model.load_state_dict(ckpt["model"])
        chain.load_state_dict(ckpt["opt"])
        self.model, self.chain = model, chain

    @precondition(lambda self: hasattr(self, "chain"))
    @invariant()
    def matches_reference(self) -> None:
        lin = self.model[0]
        torch.testing.assert_close(
            lin.parametrizations.weight.original, self.ref.w, rtol=1e-4, atol=1e-5
        )
        link = lora_parametrization(lin)
        torch.testing.assert_close(link.lora_A, self.ref.a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(link.lora_B, self.ref.bf, rtol=1e-4, atol=1e-5)
        x = torch.linspace(-1, 1, 3 * IN).reshape(3, IN)
        with torch.no_grad():
            torch.testing.assert_close(self.model(x), self.ref(x), rtol=1e-4, atol=1e-5)


ChainMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=25, deadline=None)
TestChainMachine = ChainMachine.TestCase
