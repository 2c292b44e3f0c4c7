"""Choosing modules by name: PEFT-style suffixes, a regex, a predicate, or ``"all-linear"``.

:func:`choose_targets` then checks that each chosen module can take a link: a Linear or Conv1D
(or a supported 4-bit layer), not parametrized yet, its weight neither tied to nor sharing memory
with another tensor, and at least ``rank`` wide.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential()
    >>> model.add_module("q_proj", nn.Linear(4, 4))
    >>> model.add_module("v_proj", nn.Linear(4, 4))
    >>> [name for name, _ in select_modules(model, ["q_proj"])]
    ['q_proj']
    >>> [name for name, _ in select_modules(model, "all-linear")]
    ['q_proj', 'v_proj']
"""

from __future__ import annotations

import difflib
import inspect
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeAlias, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._attach import parametrization_count
from ._dtensor import is_sharded
from ._experts import parameter_features
from ._layers import builder_for
from ._quant_backends import unsupported_quantization
from ._validate import FLOAT_DTYPES, type_name

__all__ = ["ModuleSpec"]  # the public names (chainopt re-exports them); the rest is internal

ModuleSpec: TypeAlias = str | Iterable[str] | re.Pattern[str] | Callable[[str, nn.Module], bool]
"""Names as PEFT takes them (suffixes; a list, set or any iterable of them), a compiled regex
(``fullmatch`` on the name), a predicate ``(name, module) -> bool``, or ``"all-linear"``."""

ALL_LINEAR = "all-linear"
"""PEFT's shortcut: every ``nn.Linear`` / ``Conv1D`` except the output layer, a task model's head
(:func:`task_heads`) and any module whose weight is shared with (tied to) another module."""

_TASK_MODEL = re.compile(r"For\w*(Classification|QuestionAnswering|MultipleChoice)$")


def is_linear_like(module: nn.Module) -> bool:
    """A module some layer kind's builder adapts (:data:`chainopt._layers.BUILDERS`): an
    ``nn.Linear`` (or subclass, 4-bit ones included) or a transformers ``Conv1D``."""
    return builder_for(module) is not None


def matcher(spec: ModuleSpec, argument: str) -> Callable[[str, nn.Module], bool]:
    """Turn ``spec`` into a predicate over ``(qualified_name, module)``.

    A string ``"q_proj"`` matches ``q_proj`` and any name ending in ``.q_proj``; a list (a set,
    any iterable) matches any of its strings; a compiled regex must ``fullmatch`` the qualified
    name. ``"all-linear"`` needs the model and is resolved by :func:`select_modules`.

    Args:
        spec: the user's specification.
        argument: the argument's name, for error messages.

    Raises:
        TypeError: ``spec`` is none of the accepted forms.
        ValueError: an empty list or an empty name.
    """
    given = spec
    if isinstance(spec, re.Pattern):
        pattern = spec
        return lambda name, _m: pattern.fullmatch(name) is not None
    if isinstance(spec, str):
        spec = [spec]
    if not callable(spec) and isinstance(spec, Iterable) and not isinstance(spec, _BYTES):
        spec = cast(list[str], _strings(spec))  # checked next
    if isinstance(spec, Sequence) and all(isinstance(s, str) for s in spec):
        suffixes = tuple(spec)
        if not suffixes or any(not s for s in suffixes):
            raise ValueError(
                f"{argument} must give at least one name suffix, none of them empty, got {given!r}"
            )
        dotted = tuple("." + s for s in suffixes)
        return lambda name, _m: name in suffixes or name.endswith(dotted)
    if callable(spec):
        _require_two_arguments(spec, argument)
        return spec
    raise TypeError(
        f"{argument} must be a str, an iterable of str, a compiled regex or a callable "
        f"(name, module) -> bool, got {type(given).__name__}: {given!r}"
    )


_BYTES = (bytes, bytearray, memoryview)


def _require_two_arguments(spec: Callable[..., object], argument: str) -> None:
    """Refuse a predicate that cannot be called with ``(name, module)`` (``(name, parameter)``
    for ``target_parameters``), a class (``nn.Linear``) and a module, naming the argument,
    before anything calls them (the call's own ``TypeError`` named neither). A callable whose
    signature cannot be read is taken as it is."""
    what = "parameter" if argument == "target_parameters" else "module"
    if isinstance(spec, type):
        raise TypeError(
            f"{argument} must be a str, an iterable of str, a compiled regex or a callable "
            f"(name, {what}) -> bool, got the class {spec.__name__}: to choose by type, pass "
            f"lambda name, {what}: isinstance({what}, {spec.__name__})"
            + (f" (or '{ALL_LINEAR}')" if argument == "target_modules" else "")
        )
    if isinstance(spec, nn.Module):
        raise TypeError(
            f"{argument} must be a str, an iterable of str, a compiled regex or a callable "
            f"(name, {what}) -> bool, got a {type_name(spec)} module: give its qualified name "
            "(as model.named_modules() lists it)"
        )
    try:
        signature = inspect.signature(spec)
    except (TypeError, ValueError):
        return
    try:
        signature.bind("name", None)
    except TypeError:
        raise TypeError(
            f"{argument} must be a callable (name, {what}) -> bool taking two positional "
            f"arguments, got {spec!r} with signature {signature}"
        ) from None


def readable_twice(spec: ModuleSpec | None) -> ModuleSpec | None:
    """``spec`` in a form that can be read more than once: an iterable of names (a generator,
    ``map``, ``iter(...)``: read once only) as a list; anything else as it is. The arguments are
    read several times (to match, to check, to name them in an error)."""
    if spec is None or isinstance(spec, (str, re.Pattern, *_BYTES)) or callable(spec):
        return spec  # (bytes: refused by matcher as they are, not as a list of ints)
    if isinstance(spec, Iterable):
        return cast(list[str], _strings(spec))  # a set's sorted; types checked by matcher
    return spec


def describe_spec(spec: ModuleSpec) -> str | list[str]:
    """A serialisable description of ``spec`` (for configs and error messages)."""
    if isinstance(spec, re.Pattern):
        return f"re:{spec.pattern}"
    if isinstance(spec, str):
        return spec if spec == ALL_LINEAR else [spec]
    if not callable(spec) and isinstance(spec, Iterable):
        return [str(s) for s in _strings(spec)]
    return f"callable:{getattr(spec, '__qualname__', type(spec).__name__)}"


def _strings(spec: Iterable[object]) -> list[object]:
    """An iterable's items as a list; a set's sorted (a set has no order to keep)."""
    items = list(spec)
    if isinstance(spec, (set, frozenset)) and all(isinstance(s, str) for s in items):
        return sorted(items, key=str)
    return items


def unmatched(spec: ModuleSpec, names: Sequence[str]) -> list[str]:
    """The entries of a list of names ``spec`` that match none of ``names`` (as
    :func:`matcher` matches), in order; none for a single name, a regex or a callable."""
    if isinstance(spec, (str, re.Pattern)) or callable(spec) or not isinstance(spec, Iterable):
        return []
    entries = [e for e in _strings(spec) if isinstance(e, str)]
    return [e for e in entries if not any(n == e or n.endswith(f".{e}") for n in names)]


def did_you_mean(entry: str, names: Sequence[str], in_list: bool = False) -> str:
    """A hint for a name that matches nothing: the closest suffixes of ``names``, the
    ``"all-linear"`` shortcut, or that a str is a suffix and not a regex (PEFT's reading)."""
    if entry == ALL_LINEAR and not in_list:
        return ""
    if re.sub(r"[\s_]", "-", entry.strip().lower()) in (ALL_LINEAR, f"{ALL_LINEAR}s"):
        return f"; did you mean the string '{ALL_LINEAR}' itself (not inside a list)?"
    if any(c in entry for c in "*+?|()[]{}^$\\"):
        return (
            f"; {entry!r} is read as a name suffix, not a regex (PEFT reads a str as one): pass "
            f"re.compile({entry!r}) for a regex (matched in full against the qualified name)"
        )
    suffixes = {".".join(n.split(".")[-k:]) for n in names for k in (1, 2)}
    close = difflib.get_close_matches(entry, sorted(suffixes), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


def _hint(spec: ModuleSpec, names: Sequence[str]) -> str:
    """:func:`did_you_mean` for a single name, or a list's first entry that matches nothing."""
    missing = [spec] if isinstance(spec, str) else unmatched(spec, names)
    return did_you_mean(missing[0], names, not isinstance(spec, str)) if missing else ""


def _refuse_unmatched(
    argument: str, spec: ModuleSpec, names: Sequence[str], what: str, others: int
) -> None:
    missing = unmatched(spec, names)
    if missing:
        raise ValueError(
            f"{argument} entry {missing[0]!r} matches no {what} of the model (the other entries "
            f"match {others} {what}{'s' if others != 1 else ''})"
            f"{did_you_mean(missing[0], names, in_list=True)}"
            "; a name that matches nothing is a typo or a name from another model: remove it"
        )


def shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    """Parameters reachable under more than one *module*, by ``id``: their qualified names.

    A module registered at two places is one module (adapting it once is fine); two modules
    holding one Parameter (tied embeddings and output layer) are listed here.
    """
    owners: dict[int, dict[int, str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            owners.setdefault(id(p), {}).setdefault(id(module), full)
    return {
        pid: list(by_module.values()) for pid, by_module in owners.items() if len(by_module) > 1
    }


def output_layers(model: nn.Module) -> set[int]:
    """``id`` of the model's output layer (Hugging Face ``get_output_embeddings()``), if any."""
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return set()
    try:
        out = get()
    except (NotImplementedError, AttributeError):
        return set()
    return {id(out)} if isinstance(out, nn.Module) else set()


def task_heads(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The task heads of a Hugging Face task model (``…ForSequenceClassification``, ``…ForToken
    Classification``, ``…ForQuestionAnswering``, ``…ForMultipleChoice``): its children with
    parameters other than the base model (``base_model_prefix``), such as ``score`` or
    ``classifier``. They are freshly initialised for the task, so ``"all-linear"`` leaves them
    out (PEFT does so for ``score``/``classifier`` of sequence classification); train them whole
    with ``trainable_modules``. No heads for any other model.
    """
    prefix = getattr(model, "base_model_prefix", None)
    if not _TASK_MODEL.search(type(model).__name__) or not isinstance(prefix, str):
        return []
    return [
        (name, child)
        for name, child in model.named_children()
        if name != prefix and any(True for _ in child.parameters())
    ]


def _in_head(name: str, heads: list[tuple[str, nn.Module]]) -> str | None:
    return next((h for h, _ in heads if name == h or name.startswith(f"{h}.")), None)


def select_modules(
    model: nn.Module,
    spec: ModuleSpec,
    argument: str = "target_modules",
    exclude: Iterable[nn.Module] = (),
) -> list[tuple[str, nn.Module]]:
    """Return ``(qualified_name, module)`` for every module of ``model`` that ``spec`` matches.

    The root module (name ``""``) is never matched. Order is ``model.named_modules()`` order.
    A module registered under two names is matched by either and listed once, under its first
    name (the one ``model.named_modules()`` gives).
    ``"all-linear"`` takes every Linear/Conv1D but the output layer, a task model's heads,
    modules whose weight is shared with another module, and ``exclude``.
    """
    if isinstance(spec, str) and spec == ALL_LINEAR:
        heads = {id(m) for _, head in task_heads(model) for m in head.modules()}
        skip = output_layers(model) | heads | {id(m) for m in exclude}
        return [(name, mod) for name, mod in _untied_linears(model) if id(mod) not in skip]
    match = matcher(spec, argument)
    found: dict[int, tuple[str, nn.Module]] = {}
    for first, alias, mod in _aliases(model):
        if id(mod) not in found and match(alias, mod):
            found[id(mod)] = (first, mod)
    return list(found.values())


def _aliases(model: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """``(first name, name, module)`` for every name of every module of ``model`` (the root and
    parametrize's bookkeeping apart), in ``named_modules(remove_duplicate=False)`` order: a
    module registered at two places (``nn.Sequential(lin, act, lin)``) is there under both
    names, each with the first, the name ``named_modules()`` and ``state_dict`` give it."""
    first = {id(m): n for n, m in _named(model.named_modules())}
    for name, mod in _named(model.named_modules(remove_duplicate=False)):
        yield first[id(mod)], name, mod


def left_out_weights(
    model: nn.Module, exclude: Iterable[nn.Module] = (), covered: Iterable[str] = ()
) -> list[tuple[str, int]]:
    """Matrix weights ``"all-linear"`` leaves out: ``(name, elements)`` of every parameter of two
    or more dimensions held by a module that is not a Linear/Conv1D, an embedding, a
    convolution or a norm (fused 3-D mixture-of-experts weights, routers kept as bare
    parameters), in model order; none of ``covered`` (qualified names ``target_parameters``
    adapts)."""
    done = set(covered)
    return [(n, p.numel()) for n, p in _bare_matrices(model, exclude) if n not in done]


def _bare_matrices(
    model: nn.Module, exclude: Iterable[nn.Module] = ()
) -> list[tuple[str, nn.Parameter]]:
    """``(qualified name, parameter)`` of every floating parameter of two or more dimensions
    held by a module that is not a Linear/Conv1D, an embedding, a convolution or a norm, nor in
    ``exclude``, in model order."""
    skip = {id(m) for m in exclude}
    plain = (nn.Embedding, nn.EmbeddingBag, nn.modules.conv._ConvNd, nn.LayerNorm, nn.GroupNorm)
    out = []
    for name, module in _named(model.named_modules()):
        if is_linear_like(module) or isinstance(module, plain) or id(module) in skip:
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() >= 2 and p.is_floating_point():
                out.append((f"{name}.{pname}", p))
    return out


def _fits(model: nn.Module, name: str, rank: int) -> bool:
    """Whether ``target_parameters`` takes a link of ``rank`` on the parameter ``name`` (2-D or
    3-D, each expert at least ``rank`` wide, read as :func:`choose_parameters` reads
    it)."""
    tensor = model.get_parameter(name)
    if tensor.dim() not in (2, 3):
        return False
    _experts, n_in, n_out, _t = parameter_features(
        model.get_submodule(name.rpartition(".")[0]), tensor
    )
    return rank <= min(n_in, n_out)


def _suffixes(names: list[str]) -> list[str]:
    """Short ``target_parameters`` suffixes for qualified names (``module.param``, the last two
    parts: ``"experts.gate_up_proj"``), each once, in order."""
    return list(dict.fromkeys(".".join(n.split(".")[-2:]) for n in names))


def warn_left_out(
    model: nn.Module, exclude: Iterable[nn.Module] = (), covered: Iterable[str] = (), rank: int = 1
) -> None:
    """Warn when ``"all-linear"`` leaves matrix weights frozen (see :func:`left_out_weights`);
    the parameters ``target_parameters`` adapts (``covered``) are not left out. The
    ``target_parameters`` it suggests are those a link of ``rank`` fits (Ernie 4.5's
    ``e_score_correction_bias`` ``(1, E)`` is named, not suggested, at rank 2; so is a 4-D
    one such as Kimi-Linear's ``A_log``)."""
    left = left_out_weights(model, exclude, covered)
    if not left:
        return
    from .advice import ChainLoRAWarning  # (advice imports the records, which import this)

    total = sum(p.numel() for p in model.parameters())
    share = sum(n for _, n in left) / max(total, 1)
    names = [n for n, _ in left]
    fits = _suffixes([n for n in names if _fits(model, n, rank)])
    narrow = [n for n in _suffixes(names) if n not in fits]
    advice = (
        f"To chain them, add target_parameters={fits!r} (chainopt links them expert by "
        "expert, as PEFT's target_parameters); or build"
        if fits
        else "To chain them, build"
    )
    if narrow:  # a link of this rank does not fit them: refused if named
        advice = (
            f"{narrow!r} cannot take a link of rank={rank} (an expert or matrix narrower than "
            "the rank, or a tensor neither 2-D nor 3-D): train their modules whole with "
            f"trainable_modules. {advice}"
        )
    warnings.warn(
        f"target_modules='{ALL_LINEAR}' adapts nn.Linear and Conv1D layers only; it leaves "
        f"{len(left)} matrix weights, {share:.0%} of the model's parameters, frozen: "
        f"{names[:4]}{' …' if len(names) > 4 else ''} (held by no Linear: fused "
        "mixture-of-experts weights, routers, nn.MultiheadAttention's in_proj_weight). "
        f"{advice} a PeftModel whose LoraConfig "
        "names them in target_parameters (PEFT's 'all-linear' adds them for some models, such "
        "as Mixtral, not for others) and pass it without target_modules; or name the Linear "
        "layers you want in target_modules to silence this",
        ChainLoRAWarning,
        stacklevel=5,
    )


def parameter_namesakes(
    model: nn.Module,
    spec: ModuleSpec,
    exclude: Iterable[nn.Module] = (),
    covered: Iterable[str] = (),
) -> list[str]:
    """The bare matrix parameters (:func:`left_out_weights`: fused mixture-of-experts weights,
    routers) whose qualified names a name or regex ``spec`` of ``target_modules`` matches, as it
    matches module names: ``"down_proj"`` names Qwen2-MoE's fused ``experts.down_proj`` as well
    as its shared expert's ``Linear`` (transformers 4 held each expert as a ``down_proj``
    Linear). ``target_modules`` adapts modules only, so these would stay frozen; none for
    ``"all-linear"`` (:func:`warn_left_out` names its) or a callable.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential()
        >>> model.add_module("shared", nn.Module())
        >>> model.shared.add_module("down_proj", nn.Linear(4, 4))
        >>> model.add_module("experts", nn.Module())
        >>> model.experts.down_proj = nn.Parameter(torch.zeros(2, 4, 4))
        >>> parameter_namesakes(model, ["down_proj"])
        ['experts.down_proj']
    """
    if (isinstance(spec, str) and spec == ALL_LINEAR) or (
        callable(spec) and not isinstance(spec, re.Pattern)
    ):
        return []
    match = matcher(spec, "target_modules")
    return [n for n, _ in left_out_weights(model, exclude, covered) if match(n, model)]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _namesakes_advice(namesakes: list[str]) -> str:
    more = " …" if len(namesakes) > 3 else ""
    return (
        f"{_count(len(namesakes), 'bare parameter')} {namesakes[:3]}{more} "
        "(fused mixture-of-experts weights or routers, held by no Linear), which target_modules "
        f"cannot adapt: chain them with target_parameters={_suffixes(namesakes)!r}"
    )


def warn_peft_left_out(
    model: nn.Module, config: object, layers: Sequence[nn.Module], weights: Sequence[torch.Tensor]
) -> None:
    """Warn when a PEFT adapter leaves fused mixture-of-experts weights or routers frozen that its
    ``LoraConfig`` reads as asking for, as :func:`choose_targets` warns for chainopt's own
    ``target_modules``:

    * ``target_modules`` names bare parameters (:func:`parameter_namesakes`: Qwen2-MoE's
      ``["gate_proj", "up_proj", "down_proj"]`` adapts the shared expert's Linears, not the
      fused ``experts.down_proj``; a regex string as PEFT reads it, ``re.fullmatch`` of the
      name below the PEFT wrapper), unless the config has ``target_parameters``;
    * the adapter covers every Linear layer (PEFT's ``"all-linear"``, which it expands into
      names, or the whole list) yet frozen matrix weights held by no Linear remain that no
      link merges into (``weights``): PEFT's ``"all-linear"`` adds ``target_parameters`` for
      some mixture-of-experts models (Mixtral) and not for others (Qwen2-MoE).
    """
    from .advice import ChainLoRAWarning  # (advice imports the records, which import this)

    names = getattr(config, "target_modules", None)
    if getattr(config, "target_parameters", None):
        names = None  # the user chose which bare parameters to adapt
    merged = {id(w) for w in weights}
    # matrices held by no Linear, frozen and under no link: what the adapter leaves out
    left = [(n, p) for n, p in _bare_matrices(model) if not p.requires_grad and id(p) not in merged]
    if isinstance(names, str) and names != ALL_LINEAR:
        regex = re.compile(names)  # PEFT: re.fullmatch(target_modules, name in its model)
        namesakes = [n for n, _ in left if _fullmatch_below(regex, n)]
        shown: object = names
    elif isinstance(names, list | tuple | set | frozenset):
        namesakes = parameter_namesakes(model, sorted(map(str, names)), layers)
        shown = sorted(map(str, names))
    else:
        namesakes = []
    if namesakes:
        warnings.warn(
            f"the PEFT adapter's LoraConfig(target_modules={shown!r}) "
            f"adapts {_count(len(layers), 'layer')} and also names "
            f"{_namesakes_advice(namesakes)} in the LoraConfig; PEFT leaves them frozen, so "
            "the chain cannot train them",
            ChainLoRAWarning,
            stacklevel=5,
        )
        return
    if left and _every_linear_adapted(model, layers):
        share = sum(p.numel() for _, p in left) / max(sum(p.numel() for p in model.parameters()), 1)
        shown = [n for n, _ in left]
        warnings.warn(
            f"the PEFT adapter adapts every Linear layer ({_count(len(layers), 'layer')}) but "
            f"leaves {len(left)} matrix weights, {share:.0%} of the model's parameters, frozen: "
            f"{shown[:4]}{' …' if len(shown) > 4 else ''} (held by no Linear: fused "
            "mixture-of-experts weights, routers, nn.MultiheadAttention's in_proj_weight; "
            "target_modules cannot adapt them and PEFT's 'all-linear' did not add them here); "
            "to chain them, add "
            f"LoraConfig(target_parameters={_suffixes(shown)!r}) or train them whole with "
            "modules_to_save; to leave them frozen on purpose, filter ChainLoRAWarning",
            ChainLoRAWarning,
            stacklevel=5,
        )


def _fullmatch_below(regex: re.Pattern[str], name: str) -> bool:
    """Whether ``regex`` fully matches ``name`` or a dotted tail of it: PEFT matches the names
    in the model it wraps, which a ``PeftModel`` holds under ``base_model.model.``."""
    parts = name.split(".")
    return any(regex.fullmatch(".".join(parts[i:])) for i in range(len(parts)))


def _every_linear_adapted(model: nn.Module, layers: Sequence[nn.Module]) -> bool:
    """Whether every Linear-like module of ``model`` is one of ``layers`` or inside one, trained
    whole, the output layer, a task head, or tied to another module's weight (what ``"all-
    linear"`` leaves out)."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    skip = inside | output_layers(model)
    skip |= {id(m) for _, head in task_heads(model) for m in head.modules()}
    shared = shared_parameters(model)
    for _, module in _named(model.named_modules()):
        if id(module) in skip or not is_linear_like(module):
            continue
        params = list(module.parameters())
        if any(p.requires_grad for p in params) or any(id(p) in shared for p in params):
            continue
        return False
    return bool(layers)


def _wide_enough(found: list[tuple[str, nn.Module]], rank: int) -> list[tuple[str, nn.Module]]:
    """``"all-linear"``'s layers that can take a link of ``rank``; the narrower ones (a
    shared-expert gate ``Linear(hidden, 1)`` of Qwen2-MoE, Qwen3-Next) are left out and named
    in a warning: refusing them would refuse ``"all-linear"`` on the whole model."""
    narrow = [(n, m) for n, m in found if is_linear_like(m) and min(_features(m)) < rank]
    if not narrow:
        return found
    from .advice import ChainLoRAWarning  # (advice imports the records, which import this)

    names = [n for n, _ in narrow]
    warnings.warn(
        f"target_modules='{ALL_LINEAR}' leaves {len(names)} Linear layers narrower than "
        f"rank={rank} frozen: {names[:4]}{' …' if len(names) > 4 else ''} (a link of rank "
        "r needs min(in_features, out_features) >= r). To train them, name their modules in "
        "trainable_modules (trained whole), or lower the rank",
        ChainLoRAWarning,
        stacklevel=5,
    )
    skip = {id(m) for _, m in narrow}
    return [(n, m) for n, m in found if id(m) not in skip]


def linear_names(model: nn.Module, most: int = 5) -> list[str]:
    """A few names of modules a link can adapt, for error messages: Linear-like, and not holding
    a weight tied to another module's (those are refused)."""
    return [name for name, _ in _untied_linears(model)][:most]


def _untied_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Linear-like modules whose weight no other module holds (tied ones are refused)."""
    shared = shared_parameters(model)
    return [
        (name, mod)
        for name, mod in _named(model.named_modules())
        if is_linear_like(mod) and id(getattr(mod, "weight", None)) not in shared
    ]


def _named(items: Iterable[tuple[str, nn.Module]]) -> Iterable[tuple[str, nn.Module]]:
    # Skip the root and parametrize's own bookkeeping modules.
    for name, mod in items:
        if name and ".parametrizations." not in f".{name}.":
            yield name, mod


def choose_trainable(model: nn.Module, spec: ModuleSpec | None) -> list[tuple[str, nn.Module]]:
    """The modules ``trainable_modules`` names (none for ``None``); at least one if given."""
    if spec is None:
        return []
    found = select_modules(model, spec, "trainable_modules")
    names = [alias for _first, alias, _m in _aliases(model)]
    if not found:
        hint = _hint(spec, names)
        raise ValueError(f"trainable_modules={describe_spec(spec)!r} matches no module{hint}")
    _refuse_unmatched("trainable_modules", spec, names, "module", len(found))
    return found


def choose_targets(
    model: nn.Module,
    spec: ModuleSpec,
    rank: int,
    lora_bias: bool,
    trainable: list[tuple[str, nn.Module]],
    covered: Iterable[str] = (),
) -> list[tuple[str, nn.Module]]:
    """The modules ``target_modules`` names, each checked to take a link of ``rank``.

    Refused: no match, a module that is not a Linear/Conv1D (or a supported 4-bit one), an
    already parametrized one, one on the meta device, a weight tied to or sharing memory with
    another tensor, a rank above the module's smaller dimension, ``lora_bias`` when no target
    has a bias, a trainable target; in a list of names, an entry that matches no module.
    ``"all-linear"`` warns about the matrix weights it leaves out, but those in ``covered``
    (the parameters ``target_parameters`` adapts), and leaves out (naming them in a warning)
    the layers narrower than ``rank``.
    """
    found = select_modules(model, spec, "target_modules", exclude=[m for _, m in trainable])
    if isinstance(spec, str) and spec == ALL_LINEAR:
        warn_left_out(model, [m for _, m in trainable], covered, rank)
        found = _wide_enough(found, rank)
    names = [alias for _first, alias, _m in _aliases(model)]
    namesakes = parameter_namesakes(model, spec, [m for _, m in trainable], covered)
    if not found:
        hint = f"; it names {_namesakes_advice(namesakes)}" if namesakes else _hint(spec, names)
        if isinstance(spec, str) and spec == ALL_LINEAR:
            hint += (
                " (it leaves out the output layer, a task model's heads, trainable_modules, "
                "layers narrower than the rank and layers whose weight is tied to another's)"
            )
        if is_linear_like(model):
            hint += (
                f"; the model itself is a {type_name(model)}, and the root is never adapted: "
                "wrap it (nn.Sequential(model)) and name it '0'"
            )
        adaptable = linear_names(model)
        raise ValueError(
            f"target_modules={describe_spec(spec)!r} matches no module of the model{hint}; "
            + (
                f"modules a link can adapt include {adaptable}"
                if adaptable
                else "it has no Linear or Conv1D layer a link can adapt"
            )
        )
    missing = unmatched(spec, names)
    named = (
        parameter_namesakes(model, missing, [m for _, m in trainable], covered) if missing else []
    )
    if named:
        raise ValueError(
            f"target_modules entry {missing[0]!r} matches no module of the model, but names "
            f"{_namesakes_advice(named)}"
        )
    _refuse_unmatched("target_modules", spec, names, "module", len(found))
    if namesakes:
        from .advice import ChainLoRAWarning  # (advice imports the records, which import this)

        warnings.warn(
            f"target_modules={describe_spec(spec)!r} adapts {len(found)} modules and also names "
            f"{_namesakes_advice(namesakes)}; they stay frozen otherwise. To leave them frozen "
            "without this warning, name the modules more precisely (such as "
            "'shared_expert.down_proj')",
            ChainLoRAWarning,
            stacklevel=5,
        )
    shared = shared_parameters(model)
    storages = model_storages(model)
    for name, module in found:
        unsupported = unsupported_quantization(module)
        if unsupported is not None:
            raise TypeError(
                f"target_modules matches {name!r}, {unsupported}; chainopt chains over "
                "float32, float64, bfloat16 and float16 weights, bitsandbytes Linear4bit "
                "(NF4/FP4) and torchao NF4 weights"
            )
        if not is_linear_like(module):
            raise TypeError(
                f"target_modules={describe_spec(spec)!r} matches {name!r}, a "
                f"{type_name(module)}; only torch.nn.Linear and transformers Conv1D modules "
                "can be adapted"
            )
        if parametrization_count(module) or parametrization_count(module, "bias"):
            raise ValueError(
                f"target_modules matches {name!r}, whose weight or bias is already parametrized; "
                "chainopt's link must be registered first"
            )
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        if any(t.is_meta for t in module.parameters(recurse=False)):
            raise ValueError(f"target_modules matches {name!r}, {_META}")
        tensors = [("weight", weight)]
        if lora_bias and isinstance(module.bias, torch.Tensor):
            tensors.append(("bias", module.bias))
        for kind, tensor in tensors:
            why = sharing_problem(tensor, f"{name}.{kind}", shared, storages)
            if why is not None:
                raise ValueError(
                    f"target_modules matches {name!r}, whose {kind} {why}; leave it out of "
                    f"target_modules ('{ALL_LINEAR}' leaves tied and output layers out)"
                )
        limit = min(_features(module))
        if rank > limit:
            head = _in_head(name, task_heads(model))
            hint = (
                f"; {name!r} is (in) the task head {head!r} of this {type_name(model)}, freshly "
                f"initialised for the task: leave it out of target_modules and train it whole "
                f"with trainable_modules=[{head!r}] ('{ALL_LINEAR}' leaves it out)"
                if head is not None
                else ""
            )
            raise ValueError(
                f"rank must be a positive int no larger than min(in_features, out_features)="
                f"{limit} of {name!r}, got {rank}{hint}"
            )
    if lora_bias and all(getattr(m, "bias", None) is None for _, m in found):
        raise ValueError("lora_bias=True but none of the target modules has a bias")
    _check_trainable_against_targets(trainable, found)
    return found


_META = (
    "whose parameters are on the meta device (no data): the link's factors would be drawn "
    "there, and model.to_empty() would then fill them with garbage and replace the Parameters "
    "the optimizer holds; materialise the model first (model.to_empty(device=...) and load its "
    "weights), then wrap it"
)


def _features(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a Linear (quantized ones included) or a Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[0]), int(weight.shape[1])  # Conv1D stores (in, out)


def sharing_problem(
    tensor: torch.Tensor,
    full: str,
    shared: dict[int, list[str]],
    storages: list[tuple[str, torch.Tensor]],
) -> str | None:
    """Why a knot writing into ``tensor`` (named ``full``) would change more of the model than
    its own link, or ``None``: it is tied to another module's parameter (``shared``, from
    :func:`shared_parameters`), or its memory overlaps another tensor's (``storages``, from
    :func:`model_storages`). Every kind of link (``target_modules``, ``target_parameters``,
    PEFT's own layers) is checked with it.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Embedding(6, 4), nn.Linear(4, 6))
        >>> model[1].weight = model[0].weight
        >>> sharing_problem(model[1].weight, "1.weight", shared_parameters(model),
        ...                 model_storages(model))  # doctest: +ELLIPSIS
        "is shared with ['0.weight'] (tied): a knot would merge the link into both ..."
    """
    if id(tensor) in shared:
        others = [n for n in shared[id(tensor)] if n != full]
        return (
            f"is shared with {others} (tied): a knot would merge the link into both and change "
            "the model"
        )
    overlap = _overlapping(tensor, storages)
    if overlap:
        return (
            f"shares memory with {overlap[:3]}: a knot writes into it in place and would change "
            "them too"
        )
    return None


def model_storages(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's parameters and buffers with memory of their own, for :func:`sharing_problem`."""
    named: list[tuple[str, torch.Tensor]] = list(model.named_parameters())
    named += list(model.named_buffers())
    return [(n, t) for n, t in named if _plain_storage(t)]


def _plain_storage(t: torch.Tensor) -> bool:
    """A tensor whose memory is its own storage (not meta, sharded or a wrapper subclass)."""
    return not t.is_meta and not is_sharded(t) and type(t.data) is torch.Tensor


def _overlapping(tensor: torch.Tensor, storages: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of other tensors of the model whose memory overlaps ``tensor``'s."""
    if not _plain_storage(tensor) or tensor.numel() == 0:
        return []
    ptr = tensor.untyped_storage().data_ptr()
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    out = []
    for name, other in storages:
        if other is tensor or other.numel() == 0 or other.untyped_storage().data_ptr() != ptr:
            continue
        o_start = other.data_ptr()
        if o_start < end and start < o_start + other.numel() * other.element_size():
            out.append(name)
    return out


def _check_trainable_against_targets(
    trainable: list[tuple[str, nn.Module]], targets: list[tuple[str, nn.Module]]
) -> None:
    for t_name, t_module in trainable:
        for name, module in targets:
            if module is t_module:
                raise ValueError(f"{name!r} is in both target_modules and trainable_modules")
            if any(m is module for m in t_module.modules()):
                raise ValueError(
                    f"trainable_modules matches {t_name!r}, which contains the target {name!r}: "
                    "its frozen weight would train outside the chain; name the submodules to "
                    "train instead"
                )


# --- target_parameters: links on bare 2-D / 3-D parameters (chainopt._experts) ---


def select_parameters(
    model: nn.Module, spec: ModuleSpec
) -> list[tuple[str, str, nn.Module, torch.Tensor]]:
    """``(qualified name, parameter name, module, tensor)`` of every parameter ``spec`` matches.

    Names match as for modules (suffixes of the qualified parameter name, ``"experts.down_proj"``;
    a compiled regex by ``fullmatch``; a callable ``(name, parameter) -> bool``), over each
    module's own tensors, parametrized ones included, in model order.
    """
    match = matcher(spec, "target_parameters")
    out = []
    for name, module in [("", model), *_named(model.named_modules())]:
        tensors: dict[str, torch.Tensor] = dict(module.named_parameters(recurse=False))
        if parametrize.is_parametrized(module):
            for pname in cast(nn.ModuleDict, module.parametrizations):
                tensors.setdefault(pname, cast(torch.Tensor, getattr(module, pname)))
        for pname, tensor in tensors.items():
            full = f"{name}.{pname}" if name else pname
            if match(full, cast(nn.Module, tensor)):
                out.append((full, pname, module, tensor))
    return out


def choose_parameters(
    model: nn.Module,
    spec: ModuleSpec,
    rank: int,
    targets: list[tuple[str, nn.Module]],
    trainable: list[tuple[str, nn.Module]],
) -> list[tuple[str, str, nn.Module]]:
    """The parameters ``target_parameters`` names, each checked to take a link of ``rank``.

    Returns ``(qualified name, parameter name, module)``. Refused (nothing is changed): no
    match, or an entry of a list of names that matches no parameter; one on the meta device; a
    tensor that is not a floating (float32/64, bfloat16, float16) 2-D or 3-D plain
    ``Parameter`` (a bias, a 4-bit or other wrapped tensor); one already parametrized; one of
    a module ``target_modules`` adapts or ``trainable_modules`` trains; one tied to or sharing
    memory with another tensor; a rank above an expert's smaller dimension.
    """
    what = f"target_parameters={describe_spec(spec)!r}"
    found = select_parameters(model, spec)
    if not found:
        candidates = [n for n, _, _, t in select_parameters(model, lambda _n, _t: True)
                      if t.dim() in (2, 3)][:5]  # fmt: skip
        raise ValueError(
            f"{what} matches no parameter of the model; give suffixes of qualified parameter "
            f"names such as {candidates}"
        )
    every = [n for n, *_ in select_parameters(model, lambda _n, _t: True)]
    _refuse_unmatched("target_parameters", spec, every, "parameter", len(found))
    adapted = {id(m) for _, m in targets}
    trained = {id(m) for _, t in trainable for m in t.modules()}
    shared = shared_parameters(model)
    storages = model_storages(model)
    out = []
    for full, pname, module, tensor in found:
        where = f"{what} matches {full!r}"
        if parametrize.is_parametrized(module, pname):
            raise ValueError(
                f"{where}, which is already parametrized; chainopt's link must be registered first"
            )
        if tensor.is_meta:
            raise ValueError(f"{where}, {_META}")
        if type(tensor) is not nn.Parameter or not _plain_storage(tensor):
            raise TypeError(
                f"{where}, a {type_name(tensor)} ({type_name(tensor.data)} data); chainopt links "
                "plain float Parameters only (not 4-bit, quantized or wrapped tensors)"
            )
        if tensor.dtype not in FLOAT_DTYPES or tensor.dim() not in (2, 3):
            raise ValueError(
                f"{where}, a {tensor.dtype} tensor of shape {tuple(tensor.shape)}; chainopt links "
                "2-D (out, in) and 3-D fused-experts (E, out, in) parameters of dtype float32, "
                "float64, bfloat16 or float16"
            )
        if id(module) in adapted:
            raise ValueError(
                f"{where}, a parameter of a module target_modules adapts: leave one of them out"
            )
        if id(module) in trained:
            raise ValueError(
                f"{where}, a parameter of a module trainable_modules trains whole: leave one of "
                "them out"
            )
        why = sharing_problem(tensor, full, shared, storages)
        if why is not None:
            raise ValueError(f"{where}, which {why}; leave it out of target_parameters")
        _experts, n_in, n_out, _t = parameter_features(module, tensor)
        if rank > min(n_in, n_out):
            raise ValueError(
                f"rank must be a positive int no larger than min(in_features, out_features)="
                f"{min(n_in, n_out)} of each expert of {full!r}, got {rank}"
            )
        out.append((full, pname, module))
    return out
