"""A state machine over step / knot / save-load, checked against a plain dense reference.

The reference is COLA written out by hand: a frozen dense ``W``, factors ``A``, ``B``, the same
torch optimizer over ``[A, B]``, and knots as ``W += s·B·A; A ~ U(±1/√in); B = 0; state = {}``.
"""

from __future__ import annotations

import io
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import nn

from chainopt import ChainLoRAOptimizer, NonFiniteUpdateError
from chainopt._attach import bias_delta, lora_parametrization
from chainopt.checkpoint import load_checkpoint, save_checkpoint

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


# --- several modules, bf16 weights, bias deltas, knot lists, NaN policies, checkpoint files ---

HID = 6


class DenseLink:
    """One adapted Linear spelled out: a float64 running weight/bias and plain factors.

    The weight the forward uses is the running weight rounded once to the model's dtype, which
    is what exact knots promise; the forward is the same arithmetic as chainopt's.
    """

    def __init__(self, lin: nn.Linear, rank: int, alpha: float, bias: bool) -> None:
        self.dtype = lin.weight.dtype
        self.w = lin.weight.detach().double().clone()
        self.b = lin.bias.detach().double().clone()
        self.scale = alpha / rank
        self.a = torch.zeros(rank, lin.in_features, requires_grad=True)
        self.bf = torch.zeros(lin.out_features, rank, requires_grad=True)
        self.d = torch.zeros(lin.out_features, requires_grad=True) if bias else None

    def params(self) -> list[torch.Tensor]:
        return [self.a, self.bf] + ([self.d] if self.d is not None else [])

    def new_link(self, gen: torch.Generator) -> None:
        bound = 1 / math.sqrt(self.a.shape[1])
        with torch.no_grad():
            self.a.copy_(torch.empty(self.a.shape).uniform_(-bound, bound, generator=gen))
            self.bf.zero_()
            if self.d is not None:
                self.d.zero_()

    def merge(self) -> None:
        with torch.no_grad():
            self.w += self.scale * self.bf.double() @ self.a.double()
            if self.d is not None:
                self.b += self.d.double()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.b.to(self.dtype)
        if self.d is not None:
            bias = bias + self.d.to(self.dtype)
        out = nn.functional.linear(x, self.w.to(self.dtype), bias)
        h = x if x.dtype == self.a.dtype else x.to(self.a.dtype)
        lora = nn.functional.linear(nn.functional.linear(h, self.a), self.bf) * self.scale
        return out + lora.to(out.dtype)


class DenseChain:
    """COLA on ``Linear → Tanh → Linear``, both adapted, spelled out densely."""

    def __init__(self, model: nn.Module, kw: dict[str, Any], opt: str) -> None:
        self.links = [DenseLink(model[i], kw["rank"], kw["alpha"], kw["lora_bias"]) for i in (0, 2)]
        self.gen = torch.Generator().manual_seed(kw["seed"])
        for link in self.links:
            link.new_link(self.gen)
        self.opt = FACTORIES[opt]([p for link in self.links for p in link.params()])
        self.steps = 0
        self.every, self.knots = kw.get("knot_every"), set(kw.get("knots") or ())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.links[1](torch.tanh(self.links[0](x)))

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad()
        self.steps += 1
        if (self.every and self.steps % self.every == 0) or self.steps in self.knots:
            self.knot()

    def knot(self, skip: frozenset[int] = frozenset()) -> None:
        for i, link in enumerate(self.links):
            if i not in skip:
                link.merge()
        for link in self.links:
            link.new_link(self.gen)
        self.opt.state.clear()


class WideChainMachine(RuleBasedStateMachine):
    """Two adapted modules of ``DTYPE`` weights; optional bias deltas; a knot list or an
    interval; ``non_finite`` raise or skip; saves through ``chainopt.checkpoint`` files."""

    DTYPE = torch.float32

    def __init__(self) -> None:
        super().__init__()
        self.data = torch.Generator().manual_seed(0)
        self.tmp = tempfile.TemporaryDirectory()

    def teardown(self) -> None:
        self.tmp.cleanup()

    @initialize(
        rank=st.integers(1, 5),
        alpha=st.sampled_from([1.0, 4.0, 16.0]),
        schedule=st.one_of(
            st.builds(lambda n: {"knot_every": n}, st.integers(1, 6)),
            st.lists(st.integers(1, 20), min_size=1, max_size=4, unique=True).map(
                lambda ks: {"knots": sorted(ks)}
            ),
        ),
        opt=st.sampled_from(sorted(FACTORIES)),
        seed=st.integers(0, 1000),
        lora_bias=st.booleans(),
        non_finite=st.sampled_from(["raise", "skip"]),
    )
    def setup(
        self,
        rank: int,
        alpha: float,
        schedule: dict[str, Any],
        opt: str,
        seed: int,
        lora_bias: bool,
        non_finite: str,
    ) -> None:
        self.kwargs = {
            "rank": rank,
            "alpha": alpha,
            "seed": seed,
            "lora_bias": lora_bias,
            "non_finite": non_finite,
            **schedule,
        }
        self.opt_name, self.dtype = opt, self.DTYPE
        self.model = self._model()
        self.ref = DenseChain(self.model, self.kwargs, opt)
        self.chain = self._build(self.model)

    def _model(self) -> nn.Module:
        torch.manual_seed(self.kwargs["seed"])
        return nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT)).to(self.dtype)

    def _build(self, model: nn.Module) -> ChainLoRAOptimizer:
        return ChainLoRAOptimizer(
            model, FACTORIES[self.opt_name], target_modules=["0", "2"], **self.kwargs
        )

    def _factors(self, i: int) -> list[torch.Tensor]:
        link = lora_parametrization(self.model[2 * i])
        delta = bias_delta(self.model[2 * i])
        return [link.lora_A, link.lora_B] + ([delta.delta] if delta is not None else [])

    @precondition(lambda self: hasattr(self, "chain"))
    @rule(steps=st.integers(1, 4))
    def step(self, steps: int) -> None:
        for _ in range(steps):
            x = torch.randn(6, IN, generator=self.data).to(self.dtype)
            y = torch.randn(6, OUT, generator=self.data)
            nn.functional.mse_loss(self.model(x).float(), y).backward()
            self.chain.step()
            self.chain.zero_grad()
            nn.functional.mse_loss(self.ref(x).float(), y).backward()
            self.ref.step()

    @precondition(lambda self: hasattr(self, "chain"))
    @rule()
    def knot(self) -> None:
        self.chain.tie_knot()
        self.ref.knot()

    @precondition(lambda self: hasattr(self, "chain"))
    @rule(module=st.integers(0, 1))
    def knot_with_a_nan_link(self, module: int) -> None:
        b = self._factors(module)[1]
        kept = b.detach().clone()
        with torch.no_grad():
            b[0, 0] = float("nan")
        if self.kwargs["non_finite"] == "raise":
            with pytest.raises(NonFiniteUpdateError, match="no weight was changed"):
                self.chain.tie_knot()
            with torch.no_grad():
                b.copy_(kept)  # the invariant checks that nothing else moved
        else:
            with pytest.warns(RuntimeWarning, match="dropped those links unmerged"):
                self.chain.tie_knot()
            self.ref.knot(skip=frozenset({module}))

    @precondition(lambda self: hasattr(self, "chain"))
    @rule()
    def save_and_load(self) -> None:
        path = Path(self.tmp.name) / "ckpt.pt"
        save_checkpoint(path, self.model, self.chain)
        model = self._model()
        chain = self._build(model)
        load_checkpoint(path, model, chain)
        self.model, self.chain = model, chain

    @precondition(lambda self: hasattr(self, "chain"))
    @invariant()
    def matches_reference(self) -> None:
        half = self.dtype == torch.bfloat16
        for i, ref in enumerate(self.ref.links):
            module = self.model[2 * i]
            weight = module.parametrizations.weight.original
            if half:  # the weight is the reference rounded once, to within an ulp
                exact = weight.double() + module.parametrizations.weight[0].merge_residual.double()
                torch.testing.assert_close(exact, ref.w, rtol=1e-3, atol=1e-5)
                torch.testing.assert_close(weight, ref.w.to(self.dtype), rtol=8e-3, atol=1e-5)
            else:
                torch.testing.assert_close(weight.double(), ref.w, rtol=1e-4, atol=1e-5)
            for ours, theirs in zip(self._factors(i), ref.params(), strict=True):
                tol = 2e-3 if half else 1e-5
                torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=tol)
        x = torch.linspace(-1, 1, 3 * IN).reshape(3, IN).to(self.dtype)
        with torch.no_grad():
            tol = {"rtol": 2e-2, "atol": 2e-2} if half else {"rtol": 1e-4, "atol": 1e-5}
            torch.testing.assert_close(self.model(x), self.ref(x), **tol)


class HalfWideChainMachine(WideChainMachine):
    DTYPE = torch.bfloat16


_wide = settings(max_examples=15, stateful_step_count=20, deadline=None)
WideChainMachine.TestCase.settings = _wide
HalfWideChainMachine.TestCase.settings = _wide
TestWideChainMachine = WideChainMachine.TestCase
TestHalfWideChainMachine = HalfWideChainMachine.TestCase
