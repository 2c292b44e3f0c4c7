"""PEFT's own LoRA layers as chain links: the knot works on a ``PeftModel``'s adapter.

A model that holds PEFT LoRA layers (a ``PeftModel`` from ``get_peft_model``, or a model with
injected layers) is chained through them: PEFT keeps its forward, its dropout, its rsLoRA
scaling and its per-module rank and alpha (``rank_pattern``/``alpha_pattern``); chainopt trains
PEFT's own factors of the active adapter and, at each knot, merges each layer's
``s·B·A`` into ``base_layer.weight`` exactly (one float32 sum; the merge residual for half
precision; a float32 host master for a bitsandbytes 4-bit base), restarts the link (A
Kaiming-uniform from the chain's generator, B zero) and resets its optimizer state. The first
link is PEFT's, as ``get_peft_model`` initialised it. The model's own adapter save
(``PeftModel.save_pretrained``, diffusers' ``save_lora_adapter``) writes the whole chain as one
adapter of rank Σr (:mod:`chainopt._peft_save`).

What each PEFT layer kind holds (PEFT 0.21, ``peft/tuners/lora/layer.py``), adapter ``a``, and
the delta PEFT's ``get_delta_weight`` computes (what a knot merges):

- ``Linear`` (also over a transformers ``Conv1D``, bitsandbytes ``Linear4bit``):
  ``lora_A[a].weight (r, in)``, ``lora_B[a].weight (out, r)``; delta ``s·B·A`` into
  ``base_layer.weight`` (``(s·B·A)ᵀ`` for ``Conv1D``'s ``(in, out)`` weight).
- ``Embedding``: ``lora_embedding_A[a] (r, num_embeddings)``, ``lora_embedding_B[a] (dim, r)``;
  delta ``(s·B·A)ᵀ`` into ``base_layer.weight (num_embeddings, dim)``.
- ``Conv1d/2d/3d``: ``lora_A[a]`` a convolution ``(r, in, *k)`` with the base's stride and
  padding, ``lora_B[a]`` a 1×…×1 convolution ``(out, r, 1, …)``; delta
  ``s·B₂·A₂`` reshaped to the kernel (``A₂``, ``B₂``: flattened after dimension 0).
- ``ParamWrapper`` over a 2-D parameter (``target_parameters``): as ``Linear``, into the
  parameter itself.
- ``ParamWrapper`` over fused 3-D experts ``(E, out, in)`` (or ``(E, in, out)``,
  transformers 5's Mixtral, Qwen3-MoE, …): ``lora_A[a].weight (r·E, in)`` expert by expert,
  ``lora_B[a].weight (out, r·E)`` interleaved (column ``j·E + e``); delta ``s·Bₑ·Aₑ`` into
  expert ``e``'s slice (:meth:`PeftLink.expert_factors`).

with ``s = scaling[a]`` (``alpha / r``, or ``alpha / √r`` with ``use_rslora``). Dropout acts on
the input of the LoRA branch only, so it does not enter the delta. DoRA (``use_dora=True``) on a
``Linear`` computes ``m ⊙ (V·x) / ‖V‖_row`` with ``V = W + s·B·A``; a knot that merges ``s·B·A``
into ``W`` and zeroes B leaves ``V`` and ``m`` as they were, so the function is kept and the
magnitude ``m`` trains on (it is never reset).

Refused, with the reason: several active adapters, a merged or disabled adapter, LoRA variants
other than DoRA, ``lora_bias=True``, initialisations that rewrite the base weight (PiSSA,
OLoRA, CorDA, LoftQ, ...: a save could not be loaded onto the original base), convolutions
whose LoRA branch is not the merged convolution (groups, dilation, padding mode), layer kinds
not listed above (multi-head attention, 8-bit layers), and a base weight tied to another
layer's (a tied ``embed_tokens``/``lm_head``; checked with the model, in
:meth:`chainopt.ChainConfig.from_kwargs`); and, from the adapter's ``LoraConfig``:
``inference_mode=True`` with every factor frozen (an adapter loaded without
``is_trainable=True``: PEFT froze it, and the chain would train it anyway) and
``bias="all"``/``"lora_only"`` (the chain would freeze the biases PEFT trains).

``chainopt`` never imports ``peft`` itself: a model holds PEFT layers only if ``peft`` was
imported, so :func:`peft_lora_layers` looks in ``sys.modules``.

Marks (listed in :mod:`chainopt._marks`): on each chained PEFT layer ``layer.__dict__[MARK]``
(the link) and, for a half-precision base, a ``chainopt_merge_residual`` buffer (removed by
:meth:`PeftBuilder.detach`). The model's own saves: :mod:`chainopt._peft_save`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from peft import LoraConfig, get_peft_model
    >>> model = get_peft_model(nn.Sequential(nn.Linear(6, 4)),
    ...                        LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    >>> [name for name, _ in peft_lora_layers(model)]
    ['base_model.model.0']
    >>> link = PeftLink.of(peft_lora_layers(model)[0][1])
    >>> link.scale, tuple(link.lora_A.shape), link.fan_in_fan_out
    (2.0, (2, 6), False)
"""

from __future__ import annotations

import sys
from typing import Any, cast

import torch
from torch import Tensor, nn

from ._attach import residual_dtype
from ._experts import expert_delta, split_experts
from ._marks import PEFT_LINK
from ._quant_backends import backend_for
from ._record import LinkSpec, ModuleRecord
from .quantized import QuantizedWeight

__all__ = [
    "MARK",
    "RESIDUAL",
    "PeftBuilder",
    "PeftLink",
    "active_adapter",
    "choose_peft_layers",
    "has_peft_layers",
    "is_peft_lora_layer",
    "link_of",
    "peft_config_of",
    "peft_layer_problem",
    "peft_lora_layers",
    "peft_trainable",
]

MARK = PEFT_LINK  # instance attribute of a chained PEFT layer: its PeftLink

_KINDS = ("Linear", "Linear4bit", "Embedding", "ParamWrapper", "Conv1d", "Conv2d", "Conv3d")

# init_lora_weights values that rewrite the base weight at initialisation
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "mica", "orthogonal", "lora_ga")


def _lora_module() -> Any:
    """``peft.tuners.lora`` if peft was imported, else ``None`` (never imports it)."""
    if "peft" not in sys.modules:
        return None
    return sys.modules.get("peft.tuners.lora")


def is_peft_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of PEFT's LoRA layers (any kind)."""
    lora = _lora_module()
    return lora is not None and isinstance(module, lora.LoraLayer)


def peft_lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` of every PEFT LoRA layer in ``model``, in model order."""
    if _lora_module() is None:
        return []
    return [(n, m) for n, m in model.named_modules() if is_peft_lora_layer(m)]


def has_peft_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds PEFT LoRA layers."""
    return bool(peft_lora_layers(model))


def active_adapter(layer: nn.Module) -> str | None:
    """The adapter of ``layer`` a chain trains: its one active adapter that has factors here.

    ``None`` if no active adapter has factors on this layer (another adapter's layer).

    Raises:
        ValueError: several adapters are active.
    """
    active = list(cast(Any, layer).active_adapters)
    if len(active) > 1:
        raise ValueError(
            f"PEFT has several active adapters {active}; a chain trains one: call "
            "model.set_adapter(name) first"
        )
    owned = [a for a in active if a in _factor_dicts(layer)[0]]
    return owned[0] if owned else None


def _factor_dicts(layer: nn.Module) -> tuple[Any, Any]:
    lay = cast(Any, layer)
    if _kind(layer) == "Embedding":
        return lay.lora_embedding_A, lay.lora_embedding_B
    return lay.lora_A, lay.lora_B


def _kind(layer: nn.Module) -> str:
    lora = _lora_module()
    for kind in ("Embedding", "ParamWrapper", "Linear", "Conv1d", "Conv2d", "Conv3d"):
        cls = getattr(lora, kind, None)
        if cls is not None and isinstance(layer, cls):
            return kind
    bnb = sys.modules.get("peft.tuners.lora.bnb")
    for kind in ("Linear4bit", "Linear8bitLt"):
        cls = getattr(bnb, kind, None)
        if cls is not None and isinstance(layer, cls):
            return kind
    return type(layer).__name__


def peft_layer_problem(name: str, layer: nn.Module, config: Any = None) -> str | None:
    """Why ``layer`` (adapter: its active one) cannot be chained exactly, or ``None``."""
    lay = cast(Any, layer)
    adapter = active_adapter(layer)
    if adapter is None:
        return None
    kind = _kind(layer)
    where = f"{name!r} ({kind})"
    if kind not in _KINDS:
        return (
            f"{where}: chainopt chains PEFT's Linear, Embedding, Conv1d/2d/3d and 2-D "
            f"target_parameters layers, not {kind}"
        )
    if kind == "Linear4bit" and backend_for(lay.get_base_layer()) is None:
        return f"{where}: its 4-bit base layer is of a kind chainopt cannot requantize"
    if kind.startswith("Conv"):
        conv = lay.get_base_layer()
        if conv.groups != 1 or any(d != 1 for d in conv.dilation) or conv.padding_mode != "zeros":
            return (
                f"{where}: PEFT's LoRA branch of a convolution with groups={conv.groups}, "
                f"dilation={conv.dilation}, padding_mode={conv.padding_mode!r} is not the "
                "convolution of the merged weight (PEFT builds it with groups=1, no dilation, "
                "zero padding), so no knot can keep the function"
            )
    if (
        kind == "Linear"
        and type(lay.get_base_layer()).__name__ != "Linear"
        and not getattr(lay, "is_target_conv_1d_layer", False)
    ):
        base = type(lay.get_base_layer()).__name__
        return f"{where}: the base layer is a {base}; chainopt chains PEFT layers over Linear"
    if lay.merged:
        return f"{where}: adapter {adapter!r} is merged into the base weight; unmerge() it first"
    if lay.disable_adapters:
        return f"{where}: adapters are disabled (disable_adapter() context?)"
    variant = lay.lora_variant.get(adapter)
    if variant is not None and type(variant).__name__ != "DoraLinearVariant":
        return (
            f"{where}: the LoRA variant {type(variant).__name__} cannot be chained exactly "
            "(chainopt chains plain LoRA and DoRA on Linear layers)"
        )
    if lay.lora_bias.get(adapter):
        return f"{where}: lora_bias=True is not supported by chains of PEFT layers"
    init = getattr(config, "init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        return (
            f"{where}: init_lora_weights={init!r} rewrites the base weight, so a save of the chain "
            "would not load onto the original base model; use init_lora_weights=True or "
            "'gaussian'"
        )
    a, b = _factor_dicts(layer)
    a_t = a[adapter] if kind == "Embedding" else a[adapter].weight
    b_t = b[adapter] if kind == "Embedding" else b[adapter].weight
    if not kind.startswith("Conv") and (a_t.dim() != 2 or b_t.dim() != 2):
        return f"{where}: factors of shapes {tuple(a_t.shape)}, {tuple(b_t.shape)} are not 2-D"
    return None


class PeftLink:
    """PEFT's LoRA factors of one layer's adapter, seen as a chain link (a view, no copies).

    Implements the link protocol of :mod:`chainopt._record`: ``lora_A`` ``(r, in)`` and
    ``lora_B`` ``(out, r)`` are PEFT's own Parameters; ``scale`` is PEFT's ``scaling[adapter]``;
    ``fan_in_fan_out`` is set when the weight is stored ``(in, out)`` (an ``Embedding``'s
    ``(num_embeddings, dim)``, a transformers ``Conv1D``). A convolution's factors keep their
    kernel dimensions, ``(r, in, *k)`` and ``(out, r, 1, …)``: flattened after the first
    dimension they are the matrices of the protocol, ``in_features = in·∏k``, and
    ``B·A`` reshaped is the kernel's delta.

    Attributes:
        layer: the PEFT layer.
        adapter: the adapter's name.
        weight: the tensor the link merges into (the base layer's weight, or the parameter of a
            ``ParamWrapper``).
        magnitude: DoRA's magnitude vector (trained as it is), or ``None``.
    """

    merge_residual: Tensor | None
    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def __init__(self, layer: nn.Module, adapter: str) -> None:
        lay = cast(Any, layer)
        kind = _kind(layer)
        self.layer = layer
        self.adapter = adapter
        self.kind = kind
        self.unloaded = False  # set when chainopt's unloading takes the link off its layer
        self.refresh()
        self.rank = int(self.lora_A.shape[0])
        self.ranks = frozenset({self.rank})
        self.in_features = int(self.lora_A[0].numel())
        self.out_features = int(self.lora_B.shape[0])
        self.fan_in_fan_out = kind == "Embedding" or bool(getattr(lay, "fan_in_fan_out", False))
        # PEFT's fused experts (a 3-D parameter): E experts in one pair of factors, A (r·E, in)
        # expert by expert, B (out, r·E) interleaved; a parameter (E, in, out) holds each
        # expert transposed (PEFT's "not swapped" layout).
        self.experts = int(getattr(lay, "num_experts", 1)) if kind == "ParamWrapper" else 1
        if self.experts > 1:
            self.fan_in_fan_out = not lay._did_swap_in_out_features
        self.merge_residual = None  # the builder's buffer, for a half-precision weight
        self.quant: QuantizedWeight | None = None

    @property
    def scale(self) -> float:
        """PEFT's ``scaling[adapter]`` as it is now (``alpha / r``, ``alpha / √r`` with rsLoRA;
        ``set_scale``/``scale_layer`` and diffusers' ``set_adapters(weights=...)`` change it):
        what PEFT's forward multiplies the link by, so what a knot merges."""
        return float(cast(Any, self.layer).scaling[self.adapter])

    def refresh(self) -> None:
        """Look PEFT's Parameters up again (``lora_A``, ``lora_B``, the weight, DoRA's
        magnitude): FSDP2's ``fully_shard`` replaces them by sharded ones."""
        lay = cast(Any, self.layer)
        a, b = _factor_dicts(self.layer)
        if self.adapter not in a:  # PEFT deleted the adapter: merge_problem() says so
            return
        if self.kind == "Embedding":
            self.lora_A, self.lora_B = a[self.adapter], b[self.adapter]
        else:
            self.lora_A, self.lora_B = a[self.adapter].weight, b[self.adapter].weight
        self.weight: Tensor = (
            lay.get_param() if self.kind == "ParamWrapper" else lay.get_base_layer().weight
        )
        dora = lay.lora_magnitude_vector  # a ModuleDict: no .get
        magnitude = dora[self.adapter] if self.adapter in dora else None  # noqa: SIM401
        self.magnitude: nn.Parameter | None = None if magnitude is None else magnitude.weight

    @classmethod
    def of(cls, layer: nn.Module) -> PeftLink:
        """The link of ``layer``'s active adapter.

        Raises:
            ValueError: ``layer`` has no active adapter of its own.
        """
        adapter = active_adapter(layer)
        if adapter is None:
            raise ValueError(f"{type(layer).__name__} has no active adapter with factors")
        return cls(layer, adapter)

    def weight_name(self, prefix: str) -> str:
        """The qualified name of :attr:`weight` in the model, ``prefix`` being the layer's
        (``"<layer>.base_layer.weight"`` for a ``Linear``)."""
        found = (n for n, p in self.layer.named_parameters(prefix) if p is self.weight)
        return next(found, f"{prefix}.base_layer.weight")

    def expert_factors(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """Fused experts: ``(Bₑ)`` ``(E, out, r)`` and ``(Aₑ)`` ``(E, r, in)``, as PEFT's
        ``get_delta_weight`` reads them (copies in ``dtype``)."""
        return split_experts(
            self.lora_A.detach().to(dtype), self.lora_B.detach().to(dtype), self.experts
        )

    def delta(self) -> Tensor:
        """``s·B·A`` in float32, in the weight's layout (transposed with ``fan_in_fan_out``).

        Fused experts: ``s·Bₑ·Aₑ`` for each expert ``e``, stacked ``(E, out, in)`` (or
        ``(E, in, out)``, each transposed, with ``fan_in_fan_out``).
        """
        if self.experts > 1:
            return expert_delta(
                self.lora_A, self.lora_B, self.experts, self.scale, self.fan_in_fan_out
            )
        # (out, r) @ (r, in) -> (out, in); a convolution's (out, r) @ (r, in·∏k) -> its kernel
        b, a = self.lora_B.detach().float().flatten(1), self.lora_A.detach().float().flatten(1)
        update = (b @ a).mul_(self.scale)
        if self.lora_A.dim() > 2:
            return update.view(self.weight.shape)
        return update.T if self.fan_in_fan_out else update

    def merge_problem(self) -> str | None:
        """Why merging this link now would change the model's function, or ``None``: PEFT
        deleted the adapter, merged it into the base weight (``merge_adapter``,
        ``merge_and_unload``), made another adapter active (``set_adapter``) or disabled the
        adapters (``disable_adapter()``): PEFT's forward then does not add ``s·B·A``."""
        lay = cast(Any, self.layer)
        adapter = self.adapter
        if adapter not in _factor_dicts(self.layer)[0]:
            return f"PEFT deleted its adapter {adapter!r} (delete_adapter)"
        if adapter in getattr(lay, "merged_adapters", ()):
            return (
                f"PEFT merged its adapter {adapter!r} into the base weight (merge_adapter or "
                "merge_and_unload): call unmerge_adapter() first"
            )
        if bool(getattr(lay, "disable_adapters", False)):
            return "PEFT's adapters are disabled (inside disable_adapter())"
        if adapter not in list(lay.active_adapters):
            return (
                f"its adapter {adapter!r} is not PEFT's active adapter "
                f"{list(lay.active_adapters)} (set_adapter): call set_adapter({adapter!r}) first"
            )
        return None

    def resize_(self, rank: int) -> None:
        """Nothing: a chained PEFT layer keeps the rank PEFT gave it (``rank_pattern``), whatever
        the chain's nominal rank (a chain of PEFT layers has no rank step-down)."""

    def check_factors(self, a: object, b: object) -> str | None:
        """Why ``a``, ``b`` cannot be this link's factors (the same shapes), or ``None``."""
        for name, t, mine in (("lora_A", a, self.lora_A), ("lora_B", b, self.lora_B)):
            if not isinstance(t, Tensor):
                return f"{name} is a {type(t).__name__}, not a tensor"
            if t.is_meta or not t.is_floating_point() or tuple(t.shape) != tuple(mine.shape):
                return (
                    f"{name} must be a floating tensor of shape {tuple(mine.shape)} with data, "
                    f"got {t.dtype} {tuple(t.shape)}"
                )
        return None

    def __repr__(self) -> str:
        return (
            f"PeftLink({self.kind}, adapter={self.adapter!r}, rank={self.rank}, "
            f"scale={self.scale:g})"
        )


def link_of(layer: nn.Module) -> PeftLink | None:
    """The chain link on a chained PEFT ``layer`` (``None``: not chained)."""
    link = layer.__dict__.get(MARK)
    return link if isinstance(link, PeftLink) else None


def mark(layer: nn.Module, link: PeftLink) -> None:
    """Record ``link`` on ``layer`` (an instance attribute, no submodule, no state-dict key)."""
    layer.__dict__[MARK] = link


def unmark(layer: nn.Module) -> None:
    """Remove :func:`mark`'s attribute."""
    layer.__dict__.pop(MARK, None)


# --- the builder: PEFT's layers as records (see chainopt._record) ---

RESIDUAL = "chainopt_merge_residual"  # buffer on a chained half-precision PEFT layer


class PeftBuilder:
    """PEFT's own LoRA layers (the active adapter's): the link is a view of PEFT's factors.

    :meth:`attach` registers nothing on PEFT's factors: it records a :class:`PeftLink` on the
    layer (``layer.__dict__[MARK]``), plus a ``chainopt_merge_residual`` buffer for a
    half-precision base weight, and a float32 host master for a 4-bit base
    (:mod:`chainopt.quantized`). PEFT's forward stays as it is. The first link is PEFT's own
    initialisation: nothing is redrawn.
    """

    def claims(self, module: nn.Module) -> bool:
        """A PEFT LoRA layer with factors of the active adapter."""
        return is_peft_lora_layer(module) and active_adapter(module) is not None

    def attach(
        self,
        name: str,
        module: nn.Module,
        spec: LinkSpec,
        generator: torch.Generator,
        master: Tensor | None = None,
    ) -> ModuleRecord:
        """Record the link of ``module``'s active adapter (its factors as PEFT made them)."""
        adapter = cast(str, active_adapter(module))
        base = cast(Any, module).get_base_layer()
        backend = backend_for(base)
        quant = None
        if backend is not None:
            host = None
            if spec.quantized_master == "host":
                start = master if master is not None else backend.dequantize(base)
                host = start.detach().to("cpu", torch.float32, copy=True)
                if host.device.type == "cpu" and cast(Tensor, base.weight).device.type == "cuda":
                    host = host.pin_memory()
            quant = QuantizedWeight(base, backend, host)
        link = PeftLink(module, adapter)
        if quant is None:
            dtype = residual_dtype(link.weight.dtype, spec.exact_merge)
            if dtype is not None:
                residual = torch.zeros(link.weight.shape, dtype=dtype, device=link.weight.device)
                module.register_buffer(RESIDUAL, residual)
        link.quant = quant
        mark(module, link)
        return cast(ModuleRecord, self.find(name, module))

    def find(self, name: str, module: nn.Module) -> ModuleRecord | None:
        """The record if ``module`` is a chained PEFT layer."""
        link = link_of(module)
        if link is None:
            return None
        link.refresh()  # the Parameters as they are now (FSDP2)
        link.merge_residual = dict(module.named_buffers(recurse=False)).get(RESIDUAL)
        base = cast(Any, module).get_base_layer()
        bias = getattr(base, "bias", None) if link.kind != "ParamWrapper" else None
        return ModuleRecord(name, module, link, None, link.weight, bias, link.quant, "", self)

    def detach(self, module: nn.Module) -> None:
        """Remove the mark and the residual buffer; PEFT's layer is as it was. The link is marked
        ``unloaded``: an optimizer holding it refuses to step on."""
        link = module.__dict__.get(PEFT_LINK)
        if link is not None:
            link.unloaded = True
        unmark(module)
        if RESIDUAL in dict(module.named_buffers(recurse=False)):
            delattr(module, RESIDUAL)


# --- choosing what to chain in a model that holds PEFT layers (ChainConfig.from_kwargs) ---


def peft_trainable(model: nn.Module) -> list[str]:
    """What PEFT trains besides the factors, as module names (kept trainable as they are):
    DoRA magnitudes, and the active copies of ``modules_to_save`` (and of trainable tokens)."""
    out = []
    for name, module in model.named_modules():
        if is_peft_lora_layer(module):
            adapter = active_adapter(module)
            if adapter is not None and adapter in cast(Any, module).lora_magnitude_vector:
                out.append(f"{name}.lora_magnitude_vector.{adapter}")
        elif type(module).__name__ == "ModulesToSaveWrapper":
            for child, sub in module.named_children():
                if child != "original_module" and any(p.requires_grad for p in sub.parameters()):
                    out.append(f"{name}.{child}")
        elif type(module).__name__ == "TrainableTokensWrapper":
            # the modules that hold the token deltas themselves, not the token layer, whose
            # base_layer is the frozen embedding (naming the layer trained the whole embedding,
            # which the adapter does not save)
            for sub_name, sub in module.named_modules():
                if sub_name == "original_module" or sub_name.startswith("original_module."):
                    continue
                if sub_name and any(p.requires_grad for p in sub.parameters(recurse=False)):
                    out.append(f"{name}.{sub_name}")
    return out


def choose_peft_layers(model: nn.Module, config: Any = None) -> list[tuple[str, nn.Module]]:
    """The PEFT layers a chain over ``model`` trains: those with factors of the active adapter.

    Raises:
        ValueError: none, or one that cannot be chained exactly (the reason is in the message).
    """
    layers = [(n, m) for n, m in peft_lora_layers(model) if active_adapter(m) is not None]
    if not layers:
        raise ValueError(
            "the model holds PEFT LoRA layers but none of the active adapter; call "
            "model.set_adapter(name) first"
        )
    why = _config_problem(config, layers)
    if why is not None:
        raise ValueError(f"cannot chain the PEFT adapter: {why}; nothing was changed")
    for name, layer in layers:
        why = peft_layer_problem(name, layer, config)
        if why is not None:
            raise ValueError(f"cannot chain the PEFT LoRA layer {why}; nothing was changed")
    return layers


def _config_problem(config: Any, layers: list[tuple[str, nn.Module]]) -> str | None:
    """Why the adapter's ``LoraConfig`` asks for something a chain would silently not do: an
    adapter PEFT froze for inference (none of its factors made trainable by hand since), PEFT's
    bias training."""
    if config is None:
        return None
    adapter = active_adapter(layers[0][1])
    factors = [d[adapter] for _, layer in layers for d in _factor_dicts(layer)]  # Parameter or
    trained = any(  # module (an Embedding's factors are Parameters, others Linear/Conv modules)
        f.requires_grad if isinstance(f, Tensor) else any(p.requires_grad for p in f.parameters())
        for f in factors
    )
    if getattr(config, "inference_mode", False) and not trained:
        return (
            f"adapter {adapter!r} was loaded for inference (its LoraConfig has "
            "inference_mode=True: PeftModel.from_pretrained(base, path) without is_trainable, "
            "which froze its factors and modules_to_save); load it with "
            "PeftModel.from_pretrained(base, path, is_trainable=True) to continue training it"
        )
    bias = getattr(config, "bias", "none")
    if bias != "none":
        return (
            f"LoraConfig(bias={bias!r}) makes PEFT train biases, which a chain of PEFT's layers "
            "would freeze (it trains the factors, DoRA magnitudes and modules_to_save); use "
            "bias='none', or name the modules whose parameters should train as they are in "
            "LoraConfig(modules_to_save=[...])"
        )
    return None


def peft_config_of(model: nn.Module, layer: nn.Module) -> Any:
    """The ``LoraConfig`` of ``layer``'s active adapter if ``model`` holds one (a PeftModel)."""
    configs = getattr(model, "peft_config", None)
    adapter = active_adapter(layer)
    return configs.get(adapter) if isinstance(configs, dict) and adapter is not None else None
