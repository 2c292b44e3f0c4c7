"""One way of training a copy of the base model, and the builders of each kind.

Kinds: ``full`` (AdamW over everything), ``peft`` (PEFT LoRA), ``chain`` (chainopt, no knot in
the timed window), ``chain_knot`` (chainopt tying a knot every K optimizer steps) and ``floor``
(no adapter, every weight frozen, gradients flowing to the inputs of every layer: forward and
input-gradient backward only, the least any adapter method can cost). The knot variant ties its
knots itself, with the public ``tie_knot()`` right after the optimizer step (where chainopt's own
schedule ties them), so each knot is timed on its own.

Example:
    >>> from chainopt_bench.models import ModelSpec, build_model, make_batches
    >>> spec = ModelSpec("llama", hidden=64, layers=1, seq=8, batch=2, vocab=128)
    >>> base = build_model(spec)
    >>> v = make_chain(base, "llama", "qv", LoraSpec(knot_every=2), knot_every=2)
    >>> for batch in make_batches(spec, n=4):
    ...     v.step(batch)
    >>> v.name, v.chain.knots_tied, len(v.knot_times)
    ('chainopt q,v knot/2', 2, 2)
"""

from __future__ import annotations

import copy
import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import chainopt

from .memory import reachable_tensors, transient_peak_bytes, unique_bytes
from .models import TARGET_LABEL, TARGETS
from .timing import sync

__all__ = [
    "NO_KNOT",
    "LoraSpec",
    "Variant",
    "make_chain",
    "make_floor",
    "make_full",
    "make_peft",
    "make_variants",
]

#: chainopt needs a schedule; this one never fires inside a benchmark.
NO_KNOT = 10**9


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA and optimizer settings shared by every variant.

    Attributes:
        rank: LoRA rank.
        alpha: LoRA alpha.
        lr: AdamW's learning rate.
        knot_every: K of the knot variant.
        exact_merge: chainopt's ``exact_merge`` (``None``: a merge residual for half weights).
        keep_history: chainopt's ``keep_history`` (``None``: the library's default, off).
        quantized_master: chainopt's ``quantized_master`` for 4-bit bases (``"host"``: a float32
            master in host memory, exact knots; ``"none"``: dequantize-add-requantize).
    """

    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-4
    knot_every: int = 5
    exact_merge: bool | None = None
    keep_history: bool | None = None
    quantized_master: str = "host"


@dataclass
class Variant:
    """One way of training a copy of the base model; :meth:`step` is one full training step.

    Attributes:
        name: The label in the tables.
        kind: ``full``, ``peft``, ``chain``, ``chain_knot``, ``peft_chain`` (chainopt over
            PEFT's own layers), ``peft_chain_knot`` (the same tying knots) or ``floor``.
        targets: ``"qv"`` or ``"all"`` (``None`` for full fine-tuning and the floor).
        model: This variant's copy of the base model.
        opt: Its optimizer (``None`` for the floor: nothing to train).
        chain: The ``ChainLoRAOptimizer`` (``opt`` itself) of a chainopt variant.
        knot_every: Tie a knot after every this many optimizer steps (``None``: never).
        forward: What the step calls: the model, or its ``torch.compile`` wrapper.
        inputs: Turns a batch into the forward's keyword arguments (``None``: the batch as it
            is). The floor's embeds the tokens outside the model and makes them require grad.
        compiled: Whether :meth:`compile` ran.
        optimizer_steps: Optimizer steps taken so far.
        step_times: Wall time of every timed step (s).
        cpu_times: Process CPU time of the same steps (s).
        knot_step_times: The timed steps that tied a knot (wall, s).
        knot_times: Every knot alone (wall, s).
        knot_cpu_times: Every knot alone (CPU, s).
        compiles_after_warmup: Dynamo frames compiled during this variant's timed steps.
        compiles_after_knot: The same, during the first step after each knot.
        opt_state_bytes: Largest optimizer state seen after a step.
    """

    name: str
    kind: str
    targets: str | None
    model: nn.Module
    opt: torch.optim.Optimizer | None
    chain: chainopt.ChainLoRAOptimizer | None = None
    knot_every: int | None = None
    forward: Callable[..., Any] | None = None
    inputs: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    compiled: bool = False
    optimizer_steps: int = 0
    step_times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    knot_step_times: list[float] = field(default_factory=list)
    knot_times: list[float] = field(default_factory=list)
    knot_cpu_times: list[float] = field(default_factory=list)
    compiles_after_warmup: int = 0
    compiles_after_knot: int = 0
    opt_state_bytes: int = 0

    def __post_init__(self) -> None:
        if self.forward is None:
            self.forward = self.model

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are."""
        return next(self.model.parameters()).device

    def compile(self, **kwargs: Any) -> None:
        """Step through ``torch.compile(model, **kwargs)`` from now on (the optimizer: eager)."""
        self.forward = torch.compile(self.model, **kwargs)
        self.compiled = True

    def knot_due(self, step: int) -> bool:
        """Whether this variant ties a knot after optimizer step ``step``."""
        return self.knot_every is not None and step % self.knot_every == 0

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        """Forward, backward, optimizer step (and a knot when due), ``zero_grad``."""
        assert self.forward is not None
        loss = self.forward(**(batch if self.inputs is None else self.inputs(batch))).loss
        loss.backward()
        if self.opt is None:  # the floor: nothing to update
            return
        self.opt.step()
        self.optimizer_steps += 1
        if self.knot_due(self.optimizer_steps):
            self.tie_knot()
        self.opt.zero_grad(set_to_none=True)

    def tie_knot(self) -> None:
        """Tie one knot of the chain now, timing it (wall and CPU)."""
        assert self.chain is not None, f"{self.name} has no chain"
        sync(self.device)
        c0 = time.process_time()
        t0 = time.perf_counter()
        self.chain.tie_knot()
        sync(self.device)
        self.knot_times.append(time.perf_counter() - t0)
        self.knot_cpu_times.append(time.process_time() - c0)

    def trainable_params(self) -> int:
        """Parameters with ``requires_grad``."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def optimizer_state_bytes(self) -> int:
        """Bytes of the optimizer's state tensors."""
        if self.opt is None:
            return 0
        return unique_bytes(
            v for s in self.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        )

    def host_masters(self) -> list[torch.Tensor]:
        """chainopt's float32 masters of its 4-bit targets (host memory); none otherwise.

        From the public ``state_dict()["chainopt"]["masters"]``, which holds the masters
        themselves (not copies), so their storages can be told apart from the model's.
        """
        if self.chain is None:
            return []
        return list(self.chain.state_dict()["chainopt"].get("masters", {}).values())

    def _storages(self, tensors: Sequence[torch.Tensor], skip: set[tuple[str, int]]) -> int:
        return unique_bytes(t for t in tensors if _key(t) not in skip)

    def resident_bytes(self) -> int:
        """Every tensor the model and the optimizer hold, each storage counted once.

        Parameters, buffers, gradients, optimizer state, and whatever else hangs off the two
        objects: chainopt's merge residuals, its chain history (float32 copies of merged
        links), PEFT's bookkeeping, 4-bit weights' quantization state. Found by walking the
        object graph from both roots. chainopt's host masters (4-bit targets) are left out:
        they are host memory, reported on their own (:meth:`held_bytes`).
        """
        tensors = reachable_tensors(self.model, self.opt)
        grads = [t.grad for t in tensors if t.grad is not None]
        return self._storages([*tensors, *grads], {_key(t) for t in self.host_masters()})

    def held_bytes(self) -> dict[str, int]:
        """What :meth:`resident_bytes` counts, split: model, optimizer state, the rest; and the
        host masters it leaves out."""
        masters = self.host_masters()
        model = self._storages(reachable_tensors(self.model), {_key(t) for t in masters})
        state = self.optimizer_state_bytes()
        residual = unique_bytes(
            b for name, b in self.model.named_buffers() if name.endswith("merge_residual")
        )
        return {
            "model": model,
            "opt_state": state,
            "other": self.resident_bytes() - model - state,
            "merge_residual": residual,  # part of "model": chainopt's exact-merge buffers
            "host_master": unique_bytes(masters),  # not part of any of the above
        }

    def measure_memory(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """Resident bytes at the start of a steady step, the step's transient peak, their sum.

        The measured step is an ordinary one: not a knot, not the first step after a knot (which
        allocates the fresh optimizer state of the new link).

        Args:
            batch: The batch of the measured step.

        Returns:
            ``resident``, ``transient`` and ``peak`` bytes.
        """
        self.step(batch)  # steady state: optimizer state exists, gradients are None
        for _ in range(8):  # with knots every 1 or 2 steps there is no such step: give up
            n = self.optimizer_steps
            if not (self.knot_due(n) or self.knot_due(n + 1)):
                break
            self.step(batch)
        gc.collect()
        resident = self.resident_bytes()
        if self.device.type == "cuda":
            # On CUDA the caching allocator keeps exact statistics: use them.
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            self.step(batch)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - start
        else:
            peak = transient_peak_bytes(lambda: self.step(batch), str(self.device))
        return {"resident": resident, "transient": peak, "peak": resident + peak}


def _key(t: torch.Tensor) -> tuple[str, int]:
    """A storage's identity, as :func:`unique_bytes` counts it."""
    return str(t.device), t.untyped_storage().data_ptr()


def make_floor(base: nn.Module) -> Variant:
    """The cost floor of any adapter method: a copy of ``base`` with every weight frozen.

    The step embeds the tokens outside the model (``inputs_embeds``, the same function of the
    tokens) and makes the embeddings require grad, so backward computes the gradient with
    respect to the input of every layer and no weight gradient at all; there is no optimizer.
    (``model.enable_input_require_grads()`` does the same with a forward hook, which
    ``torch.compile`` breaks the graph on.)
    """
    model = copy.deepcopy(base).requires_grad_(False)
    embed: Callable[[torch.Tensor], torch.Tensor] = model.get_input_embeddings()  # type: ignore[operator]

    def inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rest = {k: v for k, v in batch.items() if k != "input_ids"}
        return {"inputs_embeds": embed(batch["input_ids"]).requires_grad_(True), **rest}

    return Variant("floor (frozen, input grads)", "floor", None, model, None, inputs=inputs)


def make_full(base: nn.Module, lora: LoraSpec) -> Variant:
    """Full fine-tuning: AdamW over every parameter of a copy of ``base``."""
    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(model.parameters(), lr=lora.lr)
    return Variant("full FT", "full", None, model, opt)


def make_peft(base: nn.Module, arch: str, targets: str, lora: LoraSpec) -> Variant:
    """PEFT LoRA on a copy of ``base``, AdamW over its trainable parameters."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=TARGETS[arch][targets],
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(copy.deepcopy(base), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lora.lr)
    return Variant(f"PEFT LoRA {TARGET_LABEL[targets]}", "peft", targets, model, opt)


def make_chain(
    base: nn.Module, arch: str, targets: str, lora: LoraSpec, knot_every: int | None
) -> Variant:
    """chainopt over a copy of ``base``; with ``knot_every``, a knot after every K steps."""
    model = copy.deepcopy(base)
    opt = chainopt.ChainLoRAOptimizer(
        model,
        torch.optim.AdamW(model.parameters(), lr=lora.lr),
        target_modules=TARGETS[arch][targets],
        rank=lora.rank,
        alpha=lora.alpha,
        knots=[NO_KNOT],  # the variant ties its knots itself (Variant.step), to time each one
        exact_merge=lora.exact_merge,
        quantized_master=lora.quantized_master,  # type: ignore[arg-type]
        **({} if lora.keep_history is None else {"keep_history": lora.keep_history}),
    )
    label = f"chainopt {TARGET_LABEL[targets]}"
    if knot_every:
        return Variant(
            f"{label} knot/{knot_every}", "chain_knot", targets, model, opt, opt, knot_every
        )
    return Variant(label, "chain", targets, model, opt, chain=opt)


def make_peft_chain(
    base: nn.Module, arch: str, targets: str, lora: LoraSpec, knot_every: int | None = None
) -> Variant:
    """The PEFT LoRA model of :func:`make_peft`, chained: chainopt over PEFT's own layers
    (``target_modules`` omitted), no knot in the timed window; its ratio against ``peft`` is
    what chaining a PeftModel costs per step. With ``knot_every``, a knot after every K steps
    (kind ``peft_chain_knot``): what a knot on PEFT's layers costs."""
    peft = make_peft(base, arch, targets, lora)
    opt = chainopt.ChainLoRAOptimizer(
        peft.model,
        torch.optim.AdamW([p for p in peft.model.parameters() if p.requires_grad], lr=lora.lr),
        knots=[NO_KNOT],
        exact_merge=lora.exact_merge,
    )
    label = f"chainopt over PEFT {TARGET_LABEL[targets]}"
    if knot_every:
        label, kind = f"{label} knot/{knot_every}", "peft_chain_knot"
        return Variant(label, kind, targets, peft.model, opt, opt, knot_every)
    return Variant(label, "peft_chain", targets, peft.model, opt, chain=opt)


def make_variants(
    base: nn.Module,
    arch: str,
    targets: Sequence[str],
    lora: LoraSpec,
    kinds: Sequence[str] = ("full", "peft", "chain", "chain_knot"),
) -> list[Variant]:
    """Full FT and the floor once, then PEFT / chainopt / chainopt-with-knots per target set."""
    out: list[Variant] = []
    if "full" in kinds:
        out.append(make_full(base, lora))
    if "floor" in kinds:
        out.append(make_floor(base))
    for t in targets:
        if "peft" in kinds:
            out.append(make_peft(base, arch, t, lora))
        if "chain" in kinds:
            out.append(make_chain(base, arch, t, lora, None))
        if "chain_knot" in kinds:
            out.append(make_chain(base, arch, t, lora, lora.knot_every))
        if "peft_chain" in kinds:
            out.append(make_peft_chain(base, arch, t, lora))
        if "peft_chain_knot" in kinds:
            out.append(make_peft_chain(base, arch, t, lora, lora.knot_every))
    return out
