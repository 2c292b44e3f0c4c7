"""Where DeepSpeed keeps the float32 masters of the parameters it steps: one layout per engine.

ZeRO-1/2 and ``BF16_Optimizer`` keep one flat partition per param group (a parameter's
``_hp_mapping`` says which part is its own), ZeRO-3 a flat partition per sub-group (a
parameter keeps only ``ds_tensor``), the unfused optimizers a master per parameter. The
integration (:mod:`chainopt.integrations.deepspeed`) reads and writes factors through these.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["_Layout", "_deepspeed", "_layout", "_shape", "_shaped_like"]


def _deepspeed() -> Any:
    """The ``deepspeed`` package, or an ImportError that says how to get it."""
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError(
            "chainopt.integrations.deepspeed needs DeepSpeed: pip install deepspeed"
        ) from err
    return deepspeed


def _shape(p: Tensor) -> torch.Size:
    """``p``'s shape, also while ZeRO-3 holds only a partition of it."""
    shape: torch.Size = getattr(p, "ds_shape", p.shape)
    return shape


def _shaped_like(value: object, master: Tensor) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape == master.shape


# --- where DeepSpeed keeps each parameter's fp32 master ----------------------------------------


@dataclass(frozen=True)
class _Fragment:
    """``master.view(-1)[hp : hp + numel]`` holds elements ``lp : lp + numel`` of the flattened
    parameter: this rank's part of it."""

    master: Tensor
    hp: int
    lp: int
    numel: int

    def view(self, tensor: Tensor) -> Tensor:
        """This fragment of ``tensor``, a tensor laid out like :attr:`master` (its state)."""
        return tensor.view(-1).narrow(0, self.hp, self.numel)


class _Layout:
    """How a DeepSpeed optimizer wrapper keeps the masters of the parameters it trains.

    These read DeepSpeed's internal attributes (DeepSpeed 0.19); :func:`_layout` refuses a
    wrapper it does not know.
    """

    kind = ""
    partitioned = True  # masters are split over the data-parallel ranks
    gathers_weights = False  # ZeRO-3: the parameters are partitioned too

    def __init__(self, wrapper: Any) -> None:
        self.wrapper = wrapper

    def masters(self) -> list[tuple[Tensor, list[Tensor]]]:
        """Every master the wrapped optimizer steps (its state key), with the parameters in it."""
        raise NotImplementedError

    def fragments(self, p: Tensor) -> list[_Fragment]:
        """Where this rank keeps ``p``'s master (empty: other ranks keep all of it)."""
        raise NotImplementedError

    def local(self, p: Tensor) -> Tensor:
        """The model's copy of ``p``, flattened, indexed like :attr:`_Fragment.lp`."""
        return p.detach().view(-1)

    def group(self, p: Tensor) -> Any:
        """The process group ``p``'s master is partitioned over (``None``: the default)."""
        return None

    @contextmanager
    def filled_groups(self, optimizer: Any) -> Iterator[None]:
        """The wrapped optimizer's param groups hold every master meanwhile."""
        yield


class _HpMappingLayout(_Layout):
    """ZeRO-1/2 and ``BF16_Optimizer``: one flat fp32 partition per param group; each
    parameter's ``_hp_mapping`` says which part of it is the parameter's."""

    def __init__(self, wrapper: Any, flats: str, groups: str, kind: str) -> None:
        super().__init__(wrapper)
        self.flats, self.groups, self.kind = flats, groups, kind

    def masters(self) -> list[tuple[Tensor, list[Tensor]]]:
        flats = getattr(self.wrapper, self.flats)
        groups = getattr(self.wrapper, self.groups)
        return [(m, list(g)) for m, g in zip(flats, groups, strict=True)]

    def fragments(self, p: Tensor) -> list[_Fragment]:
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return []
        master = getattr(self.wrapper, self.flats)[mapping.param_group_index]
        hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
        return [_Fragment(master, int(hp.start), int(lp.start), int(lp.numel))]

    def group(self, p: Tensor) -> Any:
        return getattr(p, "_dp_group", None)


class _Stage3Layout(_Layout):
    """ZeRO-3: one flat fp32 partition per sub-group; a parameter keeps only ``ds_tensor``, its
    partition (``partition_numel()`` elements, the last rank's padded)."""

    kind = "ZeRO-3"
    gathers_weights = True

    def masters(self) -> list[tuple[Tensor, list[Tensor]]]:
        w = self.wrapper
        pairs = zip(w.fp32_partitioned_groups_flat, w.fp16_groups, strict=True)
        return [(m, list(g)) for m, g in pairs]

    def fragments(self, p: Tensor) -> list[_Fragment]:
        w = self.wrapper
        index, offset, size = w.grad_position[w.get_param_id(p)]
        start = dist.get_rank(group=self.group(p)) * int(size)
        valid = max(0, min(int(size), int(_shape(p).numel()) - start))
        if valid == 0:
            return []
        return [_Fragment(w.fp32_partitioned_groups_flat[index], int(offset), start, valid)]

    def local(self, p: Tensor) -> Tensor:
        part: Tensor = getattr(p, "ds_tensor").detach().view(-1)  # noqa: B009 (DeepSpeed's)
        start = dist.get_rank(group=self.group(p)) * part.numel()
        padded = part.new_zeros(start + part.numel())
        padded[start:] = part
        return padded

    def group(self, p: Tensor) -> Any:
        return getattr(p, "ds_process_group", None)

    @contextmanager
    def filled_groups(self, optimizer: Any) -> Iterator[None]:
        # Outside its step ZeRO-3 leaves the wrapped optimizer's param groups empty, while its
        # state is keyed by the masters: put them back, as during the step, for a state_dict.
        w = self.wrapper
        saved = [g["params"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["params"] = []
        for sub, master in enumerate(w.fp32_partitioned_groups_flat):
            optimizer.param_groups[w.sub_group_to_group_id[sub]]["params"].append(master)
        try:
            yield
        finally:
            for g, params in zip(optimizer.param_groups, saved, strict=False):
                g["params"] = params


class _UnfusedLayout(_Layout):
    """``FP16_UnfusedOptimizer`` (bf16 at stage 0): an fp32 copy of each parameter."""

    kind = "FP16_UnfusedOptimizer"
    partitioned = False

    def masters(self) -> list[tuple[Tensor, list[Tensor]]]:
        w = self.wrapper
        pairs = zip(w.fp32_groups, w.fp16_groups, strict=True)
        return [(m, [p]) for ms, ps in pairs for m, p in zip(ms, ps, strict=True)]

    def fragments(self, p: Tensor) -> list[_Fragment]:
        for m, (q,) in self.masters():
            if q is p:
                return [_Fragment(m, 0, 0, p.numel())]
        return []


def _layout(wrapper: Any) -> _Layout:
    """The layout of DeepSpeed's optimizer ``wrapper``.

    Raises:
        NotImplementedError: a wrapper chainopt does not know, or offload.
    """
    name = type(wrapper).__name__
    if name == "DeepSpeedZeroOptimizer":
        if getattr(wrapper, "cpu_offload", False):
            raise NotImplementedError(
                "chainopt does not support ZeRO-Offload (offload_optimizer) under DeepSpeed: "
                "knots were not tested with offloaded masters"
            )
        stage = 2 if getattr(wrapper, "partition_gradients", False) else 1
        flats, groups = "single_partition_of_fp32_groups", "bit16_groups"
        return _HpMappingLayout(wrapper, flats, groups, f"ZeRO-{stage}")
    if name == "BF16_Optimizer":
        return _HpMappingLayout(wrapper, "fp32_groups_flat_partition", "bf16_groups", name)
    if name == "DeepSpeedZeroOptimizer_Stage3":
        if getattr(wrapper, "offload_optimizer", False) or getattr(wrapper, "offload_param", False):
            raise NotImplementedError(
                "chainopt does not support ZeRO-3 offload (offload_optimizer/offload_param) "
                "under DeepSpeed: knots were not tested with offloaded masters or parameters"
            )
        return _Stage3Layout(wrapper)
    if name == "FP16_UnfusedOptimizer":
        return _UnfusedLayout(wrapper)
    raise NotImplementedError(
        f"chainopt does not support DeepSpeed's {name} optimizer wrapper (supported: stage 0, "
        "ZeRO-1/2/3, BF16_Optimizer, FP16_UnfusedOptimizer)"
    )


# --- the integration ---------------------------------------------------------------------------
