"""Registering a link on every module a :class:`~chainopt.ChainConfig` names.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt.config import ChainConfig
    >>> model = nn.Sequential(nn.Linear(4, 4).half())
    >>> config = ChainConfig.from_kwargs(model, target_modules=["0"], rank=2, knot_every=5)
    >>> [record] = adapt_modules(model, config, torch.Generator().manual_seed(0))
    >>> record.link.lora_A.dtype, record.link.merge_residual.dtype  # float32 factors, exact merges
    (torch.float32, torch.float32)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._validate import type_name
from .adapted import AdaptedModule, attach, attach_bias_delta, detach, guard_loads, is_conv1d
from .config import ChainConfig
from .optimizer_state import regroup, verify_steps_factors
from .quantized import attach_quantized, quantized_backend

__all__ = ["adapt_modules", "residual_dtype", "stock_forward", "wrap"]

_HALF = (torch.float16, torch.bfloat16)


def residual_dtype(weight: torch.dtype, exact_merge: bool | None) -> torch.dtype | None:
    """The merge residual's dtype for a weight of dtype ``weight`` (``None``: no residual).

    Only half-precision weights get one, unless ``exact_merge=False``. A float32 or float64
    weight's knot already is one rounding of ``W + s·B·A`` (summed in the weight's dtype), and a
    residual in that dtype would hold ``exact - rounded`` computed in the same dtype: always 0.
    So ``exact_merge=True`` allocates nothing there.
    """
    if exact_merge is False:
        return None
    if weight == torch.bfloat16:
        return torch.bfloat16  # same exponent range as float32: enough for what rounding drops
    if weight == torch.float16:
        return torch.float32  # a float16 residual would be subnormal
    return None


def stock_forward(module: nn.Module) -> bool:
    """``module`` runs ``nn.Linear``'s (or ``Conv1D``'s) own forward, which the fused one replaces.

    A subclass with a forward of its own keeps it; it then reads the materialised weight.
    """
    forward = getattr(type(module), "forward", None)
    if is_conv1d(module):
        conv1d = next(c for c in type(module).__mro__ if c.__name__ == "Conv1D")
        return bool(forward is getattr(conv1d, "forward", None))
    return bool(forward is nn.Linear.forward)


def adapt_modules(
    model: nn.Module,
    config: ChainConfig,
    generator: torch.Generator,
    masters: Mapping[str, Tensor] | None = None,
) -> list[AdaptedModule]:
    """Attach the first link to every module of ``config.modules``; all of them or none.

    Factors are float32 for half-precision and quantized weights (else the weight's dtype)
    unless ``config.factor_dtype`` says otherwise; half-precision weights get a merge residual;
    a quantized layer gets a master (from ``masters[name]`` if given, see
    :mod:`chainopt.quantized`).
    """
    records: list[AdaptedModule] = []
    try:
        for name in config.modules:
            module = model.get_submodule(name)
            backend = quantized_backend(module)
            if backend is not None:
                attach_quantized(
                    module,
                    backend,
                    config.ranks[0],
                    config.alpha,
                    master=config.quantized_master,
                    master_weight=(masters or {}).get(name),
                    factor_dtype=config.factor_dtype,
                    generator=generator,
                    ranks=config.ranks,
                )
                if config.lora_bias and getattr(module, "bias", None) is not None:
                    attach_bias_delta(module, config.factor_dtype or torch.float32)
                records.append(AdaptedModule.of(name, module))
                continue
            weight = module.weight
            if not isinstance(weight, Tensor):  # pragma: no cover - the config checked it
                raise TypeError(f"{name!r} has no weight tensor")
            half = weight.dtype in _HALF
            attach(
                module,
                config.ranks[0],
                config.alpha,
                bias=config.lora_bias and getattr(module, "bias", None) is not None,
                factor_dtype=config.factor_dtype or (torch.float32 if half else weight.dtype),
                residual_dtype=residual_dtype(weight.dtype, config.exact_merge),
                generator=generator,
                ranks=config.ranks,
                fused=stock_forward(module),
            )
            records.append(AdaptedModule.of(name, module))
    except BaseException:
        for r in records:
            detach(r.module)
        raise
    return records


def wrap(
    model: nn.Module,
    optimizer: Optimizer | Callable[[list[nn.Parameter]], Optimizer],
    config: ChainConfig,
    generator: torch.Generator,
    keep: list[nn.Parameter],
    masters: Mapping[str, Tensor] | None = None,
) -> tuple[list[AdaptedModule], Optimizer]:
    """Adapt the modules, freeze the rest, build or regroup the optimizer; undo all on failure.

    Returns:
        The adapted modules and the optimizer that steps their factors (and ``keep``).

    Raises:
        TypeError: a factory that returns no ``torch.optim.Optimizer``.
        ValueError: an optimizer that would not step the factors (see
            :func:`~chainopt.optimizer_state.verify_steps_factors`).
    """
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    records: list[AdaptedModule] = []
    try:
        records = adapt_modules(model, config, generator, masters)
        factors = [p for r in records for p in r.factors()]
        trainable = {id(p) for p in factors} | {id(p) for p in keep}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        if isinstance(optimizer, Optimizer):
            regroup(optimizer, records, keep)
            base = optimizer
        else:
            base = optimizer([*factors, *keep])
            if not isinstance(base, Optimizer):
                raise TypeError(
                    f"optimizer factory must return a torch.optim.Optimizer, got {type_name(base)}"
                )
        verify_steps_factors(base, factors, keep)
        guard_loads(model)
        return records, base
    except BaseException:
        for r in records:
            detach(r.module)
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        raise
