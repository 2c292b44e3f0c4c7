"""Checking a saved ``ChainLoRAOptimizer`` state, and writing it back.

:func:`chain_entry` is the ``"chainopt"`` entry of the optimizer's state dict;
:func:`check_saved_state` checks a saved state whole before any of it is loaded, and
:func:`restore` writes the checked state into the optimizer, the model and the chain. (The
wrapped optimizer's param groups are rewritten at construction: :mod:`chainopt._build`.)

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt import ChainLoRAOptimizer
    >>> model = nn.Sequential(nn.Linear(4, 4))
    >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                          target_modules=["0"], rank=2, knot_every=1)
    >>> entry = opt.state_dict()["chainopt"]
    >>> entry["optimizer_steps"], entry["knots_tied"], entry["config"]["ranks"]
    (0, 0, [2])
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._experts import ParameterLink
from ._fingerprint import Fingerprint, check_fingerprint, fingerprint
from ._load_guard import check_incoming_state, state_restored
from ._marks import BASE_MERGED, mark_base_merged
from ._scratch import scratch_copy
from ._surgery import forget_parameter_sizes
from ._validate import is_int, type_name
from .history import KnotRecord, parse_history
from .knot import Chain

__all__ = [
    "CheckedState",
    "chain_entry",
    "check_saved_state",
    "restore",
]


@dataclass(frozen=True)
class CheckedState:
    """A saved state, checked and split: what ``load_state_dict`` then writes."""

    base: dict[str, Any]
    optimizer_steps: int
    knots_tied: int
    generator: Tensor
    history: tuple[bool, list[KnotRecord]]
    model: dict[str, Tensor]
    masters: dict[str, Tensor]
    weights: Fingerprint | None = None
    merged_before: dict[str, int | None] | None = None
    read: dict[str, tuple[bool, bool]] | None = None


def chain_entry(chain: Chain, optimizer_steps: int, version: int) -> dict[str, Any]:
    """The ``"chainopt"`` entry of a state dict: config, counters, generator, history, masters."""
    entry: dict[str, Any] = {
        "version": version,
        "config": chain.config.to_dict(),
        "optimizer_steps": optimizer_steps,
        "knots_tied": chain.knots_tied,
        "generator": chain.generator.get_state(),
        "history": chain.history.state_dict(),
    }
    masters = {
        r.name: r.quant.master for r in chain.records if r.quant and r.quant.master is not None
    }
    if masters:  # 4-bit targets: the float32 masters are the chain's state
        entry["masters"] = masters
    entry["weights"] = fingerprint(chain.records)  # what the history describes (a load checks)
    entry["merged_before"] = dict(chain.merged_before)  # earlier chains under the history
    # where each parameter link was read, (in its module's forward, elsewhere): an export in
    # another process refuses what PEFT cannot serve without a forward run there first
    entry["read"] = {
        r.name: [r.link.read_in_owner, r.link.read_elsewhere]
        for r in chain.records
        if isinstance(r.link, ParameterLink)
    }
    return entry


def restore(chain: Chain, model: nn.Module, checked: CheckedState) -> None:
    """Write a checked state into the wrapped optimizer, the model and the chain."""
    chain.optimizer.load_state_dict(checked.base)
    if checked.model:
        model.load_state_dict(checked.model, strict=False)
    forget_parameter_sizes(chain.optimizer)  # the factors may have another rank now (LBFGS)
    for r in chain.records:
        if r.quant is not None and r.quant.master is not None:
            r.quant.master.copy_(checked.masters[r.name])
            r.quant.restored = True  # a model load of the weights saved with it keeps it
    chain.knots_tied = checked.knots_tied
    chain.generator.set_state(checked.generator)
    chain.history.keep_factors, chain.history.knots = checked.history
    chain.pending = None
    # the history describes the model again if its weights are those saved with the state (a
    # model load may follow: it is checked against the same fingerprint)
    state_restored(model, weights=checked.weights, records=chain.records)
    if checked.merged_before is not None:  # the weights hold earlier chains: the model says so
        chain.merged_before = dict(checked.merged_before)
        earlier = {k: v for k, v in checked.merged_before.items() if v != 0}
        if earlier and BASE_MERGED not in model.__dict__:
            mark_base_merged(model, earlier)
    for r in chain.records:  # what was seen before the save, besides what was seen since
        if checked.read and isinstance(r.link, ParameterLink) and r.name in checked.read:
            in_owner, elsewhere = checked.read[r.name]
            r.link.read_in_owner = r.link.read_in_owner or in_owner
            r.link.read_elsewhere = r.link.read_elsewhere or elsewhere


def check_saved_state(
    state_dict: object,
    chain: Chain,
    param_groups: list[dict[str, Any]],
    version: int,
    model: nn.Module,
) -> CheckedState:
    """Check all of a saved ``ChainLoRAOptimizer`` state against ``chain``; change nothing.

    ``param_groups`` are the wrapped optimizer's; ``version`` the newest state format read;
    ``model`` the chained model (the state may carry its chain tensors).

    Raises:
        TypeError: ``state_dict`` is not a dict.
        ValueError: what is wrong, first found.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type_name(state_dict)}")
    entry = state_dict.get("chainopt")
    if not isinstance(entry, dict):
        raise ValueError(
            "state_dict has no 'chainopt' entry: it was not saved by "
            "ChainLoRAOptimizer.state_dict(). torch.distributed.checkpoint's get_state_dict/"
            "get_optimizer_state_dict (which Accelerate's save_state calls under FSDP2) keep only "
            "'state' and 'param_groups', so the chain's counters, generator and history are not "
            "in what they save: save with chainopt.save_checkpoint(path, model, opt) on every "
            "rank, or torch.save(opt.state_dict()) on each rank. Nothing was loaded"
        )
    saved_version = entry.get("version")
    if saved_version not in range(1, version + 1):
        raise ValueError(
            f"state_dict was saved by a chainopt state format of version {saved_version!r}; this "
            f"chainopt reads versions 1 to {version}"
        )
    saved_config = entry.get("config")
    if not isinstance(saved_config, dict):
        raise ValueError("state_dict['chainopt'] has no 'config' dict")
    diff = chain.config.differences(saved_config)
    if diff:
        raise ValueError(
            "state_dict was saved with a different chain config (saved, current): "
            + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items())
        )
    steps, knots = entry.get("optimizer_steps"), entry.get("knots_tied")
    for name, value in (("optimizer_steps", steps), ("knots_tied", knots)):
        if not is_int(value) or value < 0:  # type: ignore[operator]
            raise ValueError(f"state_dict['chainopt'][{name!r}] must be an int >= 0, got {value!r}")
    generator = entry.get("generator")
    expected = chain.generator.get_state()
    if not (
        isinstance(generator, Tensor)
        and generator.dtype == expected.dtype
        and generator.shape == expected.shape
    ):
        raise ValueError(
            f"state_dict['chainopt']['generator'] must be a {expected.dtype} tensor of shape "
            f"{tuple(expected.shape)} (a CPU generator state), got {generator!r:.80}"
        )
    if generator.is_meta:
        raise ValueError("state_dict['chainopt']['generator'] is on the meta device (no data)")
    try:  # the right size is not enough: a scratch generator must accept it
        torch.Generator().set_state(generator.cpu())
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(
            f"state_dict['chainopt']['generator'] is not a valid CPU generator state: {err}"
        ) from err
    history = parse_history(entry.get("history"))
    _check_history(history[1], chain)
    tensors = entry.get("model", {})
    if not isinstance(tensors, dict) or not all(isinstance(t, Tensor) for t in tensors.values()):
        raise ValueError("state_dict['chainopt']['model'] must map keys to tensors")
    problems = check_incoming_state(model, tensors)
    unknown = sorted(set(tensors) - set(model.state_dict()))
    if problems or unknown:
        raise ValueError(
            f"state_dict['chainopt']['model'] does not fit the model: {(problems + unknown)[:3]}"
        )
    base = {k: v for k, v in state_dict.items() if k != "chainopt"}
    _check_base(base, chain, param_groups, int(knots))  # type: ignore[arg-type]
    masters = _check_masters(entry.get("masters", {}), chain)
    weights = check_fingerprint(entry.get("weights"), chain.records)
    merged_before = _check_merged_before(entry.get("merged_before"), chain)
    read = _check_read(entry.get("read"), chain)
    return CheckedState(base, int(steps), int(knots), generator.cpu(), history, tensors, masters,  # type: ignore[arg-type]
                        weights, merged_before, read)  # fmt: skip


def _check_read(saved: object, chain: Chain) -> dict[str, tuple[bool, bool]] | None:
    """Where each parameter link was read before the save: ``[in its module's forward,
    elsewhere]`` under its module's name (``None``: a state saved before it was kept)."""
    if saved is None:
        return None
    names = {r.name for r in chain.records if isinstance(r.link, ParameterLink)}
    if not isinstance(saved, dict) or not all(
        isinstance(k, str)
        and k in names
        and isinstance(v, (list, tuple))
        and len(v) == 2
        and all(isinstance(b, bool) for b in v)
        for k, v in saved.items()
    ):
        raise ValueError(
            "state_dict['chainopt']['read'] must map the chain's parameter links to two bools "
            f"(read in their module's forward, read elsewhere), got {saved!r:.200}"
        )
    return {k: (bool(v[0]), bool(v[1])) for k, v in saved.items()}


def _check_merged_before(saved: object, chain: Chain) -> dict[str, int | None] | None:
    """The rank earlier chains had merged into each module (``None``: a state saved before it
    was kept); each an int >= 0 or ``None`` (not known), named after one of the chain's modules."""
    if saved is None:
        return None
    names = {r.name for r in chain.records}
    if not isinstance(saved, dict) or not all(
        isinstance(k, str) and k in names and (v is None or (is_int(v) and v >= 0))
        for k, v in saved.items()
    ):
        raise ValueError(
            "state_dict['chainopt']['merged_before'] must map the chain's module names to the "
            f"rank earlier chains merged (an int >= 0, or None), got {saved!r:.200}"
        )
    return dict(saved)


def _check_masters(saved: object, chain: Chain) -> dict[str, Tensor]:
    """The saved float32 masters of the chain's 4-bit targets, one per target, shapes checked."""
    wanted = {
        r.name: r.quant.master for r in chain.records if r.quant and r.quant.master is not None
    }
    if not isinstance(saved, dict) or set(saved) != set(wanted):
        got = sorted(saved) if isinstance(saved, dict) else saved
        raise ValueError(
            f"state_dict['chainopt']['masters'] must hold the masters of {sorted(wanted)}, "
            f"got {got!r:.200}"
        )
    for name, master in wanted.items():
        tensor = saved[name]
        if not (
            isinstance(tensor, Tensor)
            and tensor.shape == master.shape
            and tensor.is_floating_point()
            and not tensor.is_meta
        ):
            raise ValueError(
                f"state_dict['chainopt']['masters'][{name!r}] must be a float tensor of shape "
                f"{tuple(master.shape)} with data, got {tensor!r:.80}"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"state_dict['chainopt']['masters'][{name!r}] holds NaN or Inf: a knot would "
                "write it into the 4-bit weight"
            )
    return dict(saved)


def _check_history(knots: list[KnotRecord], chain: Chain) -> None:
    """Every saved link factor fits its module: ``A`` is ``(r·E, in)``, ``B`` is ``(out, r·E)``
    (``E`` experts stacked, 1 for a layer), a bias delta ``(out,)``, all with data (an export
    stacks them into the adapter, expert by expert)."""
    sizes = {
        r.name: (r.link.out_features, r.link.in_features, r.link.experts) for r in chain.records
    }
    for i, knot in enumerate(knots):
        for name, f in knot.links.items():
            where = f"state_dict['chainopt']['history'] knot {i}, module {name!r}"
            if name not in sizes:
                raise ValueError(f"{where}: no such adapted module in this chain")
            out, inp, e = sizes[name]
            tensors = [t for t in (f.A, f.B, f.bias) if t is not None]
            if any(t.is_meta for t in tensors):
                raise ValueError(f"{where}: a factor is on the meta device (no data)")
            rank = f.A.shape[0]
            if (
                tuple(f.A.shape) != (rank, inp)
                or tuple(f.B.shape) != (out, rank)
                or rank < 1
                or rank % e
            ):
                r = "r" if e == 1 else f"r·{e}"
                over = "" if e == 1 else f" for each of {e} experts"
                raise ValueError(
                    f"{where}: factors A {tuple(f.A.shape)} and B {tuple(f.B.shape)} do not fit "
                    f"a ({out}, {inp}) weight{over}: A must be ({r}, {inp}) and B ({out}, {r})"
                )
            if f.bias is not None and tuple(f.bias.shape) != (out,):
                raise ValueError(
                    f"{where}: bias delta of shape {tuple(f.bias.shape)}, not ({out},)"
                )


def _check_base(
    base: dict[str, Any], chain: Chain, current: list[dict[str, Any]], knots_tied: int
) -> None:
    """The wrapped optimizer's saved groups and per-parameter state fit the chain's parameters.

    Factors are expected in the shape of the saved link's rank. Each parameter's saved state must
    hold every tensor the optimizer keeps for such a parameter, of the shape it keeps it in (what
    a scratch copy of the optimizer holds after one step: :func:`_state_rules`); none on meta.
    """
    groups, state = base.get("param_groups"), base.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise ValueError("the wrapped optimizer's state has no 'param_groups' list / 'state' dict")
    sizes = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in groups]
    if sizes != [len(g["params"]) for g in current]:
        raise ValueError(
            f"the saved optimizer has param groups of sizes {sizes}, this one "
            f"{[len(g['params']) for g in current]}"
        )
    rank = chain.config.link_rank(knots_tied)
    shapes: dict[int, tuple[int, ...]] = {}
    for r in chain.records:
        # The link's logical sizes, not the tensors' shapes: an engine may hold a partition.
        # A link of one fixed rank (a PEFT layer's, rank_pattern) keeps its own.
        link = r.link
        own = rank if rank in getattr(link, "ranks", (rank,)) else getattr(link, "rank", rank)
        if isinstance(link, ParameterLink):  # fused experts: a rank-r link per expert
            own *= link.experts
        if link.lora_A.dim() == 2:
            shapes[id(link.lora_A)] = (own, link.in_features)
            shapes[id(link.lora_B)] = (link.out_features, own)
    by_index = {
        i: (g, p)
        for g, (saved, group) in enumerate(zip(groups, current, strict=True))
        for i, p in zip(saved["params"], group["params"], strict=True)
    }
    rules: dict[tuple[Any, ...], dict[str, tuple[int, ...] | None] | None] = {}
    for index, entry in state.items():
        found = by_index.get(index)
        if found is None or not isinstance(entry, dict):
            raise ValueError(f"the saved optimizer state has an entry {index!r} for no parameter")
        group, param = found
        want = shapes.get(id(param), tuple(param.shape))
        spec = (group, want, param.dtype)
        if spec not in rules:
            rules[spec] = _state_rules(chain.optimizer, group, want, param)
        _check_param_state(index, entry, want, rules[spec])
    # Each group's saved hyperparameters, and one of its parameters' saved state, loaded into a
    # scratch copy of the optimizer that then steps: what the optimizer would do with them.
    for g, (saved_group, current_group) in enumerate(zip(groups, current, strict=True)):
        if not current_group["params"]:
            continue
        index = next((i for i in saved_group["params"] if i in state), saved_group["params"][0])
        param = by_index[index][1]
        want = shapes.get(id(param), tuple(param.shape))
        why = _dry_run(chain.optimizer, g, saved_group, state.get(index, {}), want, param)
        if why is not None:
            raise ValueError(
                f"the saved optimizer state of param group {g} (parameter {index!r}) does not "
                f"work in this optimizer: {why}"
            )


def _dry_run(
    optimizer: Optimizer,
    group: int,
    saved_group: dict[str, Any],
    entry: dict[str, Any],
    shape: tuple[int, ...],
    like: Tensor,
) -> str | None:
    """Why a scratch copy of ``optimizer`` over one zero parameter of ``shape`` cannot load the
    saved group's hyperparameters and ``entry`` and step (``None``: it can, or no scratch copy
    can be made or step here: a sharded parameter or state, an optimizer that cannot be
    copied)."""
    tensors = [v for v in _flat(entry).values() if isinstance(v, Tensor)]
    if type(like) not in (Tensor, nn.Parameter) or any(type(v) is not Tensor for v in tensors):
        return None  # sharded (DTensor) or engine-held: the per-tensor rules above checked it
    device = like.device if like.device.type != "meta" else torch.device("cpu")
    devices = [device] if device.type == "cuda" else []

    def scratch() -> tuple[Optimizer, Tensor]:
        param = torch.zeros(shape, dtype=like.dtype, device=device, requires_grad=True)
        param.grad = torch.zeros_like(param)
        return scratch_copy(optimizer, group, param), param

    def step(opt: Optimizer) -> None:
        train = getattr(opt, "train", None)  # schedule-free optimizers step in train mode only
        if callable(train):
            train()
        with torch.random.fork_rng(devices=devices):
            try:
                opt.step()
            except TypeError:  # an optimizer that needs a closure (LBFGS)
                opt.step(lambda: 0.0)

    try:  # the optimizer itself must copy and step here, or there is nothing to tell
        step(scratch()[0])
        copied, _ = scratch()
    except Exception:
        return None
    hyper = {k: copy.deepcopy(v) for k, v in saved_group.items() if k != "params"}
    try:
        copied.load_state_dict(
            {
                "state": {0: copy.deepcopy(entry)} if entry else {},
                "param_groups": [{**hyper, "params": [0]}],
            }
        )
        step(copied)
    except Exception as err:
        return f"{type(err).__name__}: {err}"[:300]
    return None


def _check_param_state(
    index: Any,
    entry: dict[str, Any],
    want: tuple[int, ...],
    rule: dict[str, tuple[int, ...] | None] | None,
) -> None:
    """One parameter's saved state against what the optimizer keeps for a parameter of logical
    shape ``want`` (``rule``: key -> shape of the tensor it keeps, ``None`` for a non-tensor;
    ``None`` when no scratch copy of the optimizer could tell: then only tensors with as many
    dimensions as the parameter are checked, against its shape)."""
    entry = _flat(entry)
    for key, value in entry.items():
        if isinstance(value, Tensor) and value.is_meta:
            raise ValueError(
                f"the saved optimizer state {key!r} of parameter {index} is on the meta device"
            )
    if rule is None:
        for key, value in entry.items():
            if (
                isinstance(value, Tensor)
                and value.dim() == len(want) > 0
                and tuple(value.shape) != want
            ):
                raise ValueError(
                    f"the saved optimizer state {key!r} of parameter {index} has shape "
                    f"{tuple(value.shape)}; the parameter's is {want}"
                )
        return
    for key, shape in rule.items():
        if shape is None:
            continue
        value = entry.get(key)
        if not isinstance(value, Tensor):
            raise ValueError(
                f"the saved optimizer state of parameter {index} has no tensor {key!r} (got "
                f"{type_name(value)}); the optimizer keeps one of shape {shape} for it"
            )
        if tuple(value.shape) != shape:
            raise ValueError(
                f"the saved optimizer state {key!r} of parameter {index} has shape "
                f"{tuple(value.shape)}; the optimizer keeps it as {shape} for a parameter of "
                f"shape {want}"
            )


def _state_rules(
    optimizer: Optimizer, group: int, shape: tuple[int, ...], like: Tensor
) -> dict[str, tuple[int, ...] | None] | None:
    """What ``optimizer`` keeps for a parameter of ``shape`` in param group ``group``: the state
    a scratch copy of it (same class, same hyperparameters, a zero parameter of that shape and
    dtype) holds after one step with a zero gradient. ``None`` when no scratch copy can step."""
    device = like.device if like.device.type != "meta" else torch.device("cpu")
    scratch_param = torch.zeros(shape, dtype=like.dtype, device=device, requires_grad=True)
    scratch_param.grad = torch.zeros_like(scratch_param)
    devices = [device] if device.type == "cuda" else []
    try:  # an optimizer that draws random numbers draws them from a fork: the RNGs stay as they are
        scratch = scratch_copy(optimizer, group, scratch_param)
        with torch.random.fork_rng(devices=devices):
            try:
                scratch.step()
            except TypeError:  # an optimizer that needs a closure (LBFGS)
                scratch.step(lambda: 0.0)
        saved = scratch.state_dict()["state"]  # as the state is saved (bitsandbytes nests it)
        kept = _flat(next(iter(saved.values()), {}))
    except Exception:  # any failure: fall back to the plain shape rule
        return None
    return {k: (tuple(v.shape) if isinstance(v, Tensor) else None) for k, v in kept.items()}


def _flat(entry: dict[Any, Any], prefix: str = "") -> dict[str, Any]:
    """A parameter's saved state with nested dicts flattened to ``"outer.inner"`` keys."""
    out: dict[str, Any] = {}
    for key, value in entry.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out
