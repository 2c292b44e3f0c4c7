"""The chain so far: what each knot merged, per module.

Every knot appends one :class:`KnotRecord`: the step it was tied at and, per module, the norm of
the merged update ``‖s·B·A‖_F`` and (when the optimizer keeps history) float32 copies of the
factors. The whole chain is ``Σᵢ sᵢ·Bᵢ·Aᵢ = [s₁B₁ … s_LB_L]·[A₁; …; A_L]``, one LoRA of rank
``Σ rᵢ``: :meth:`ChainHistory.stacked` returns those two factors (what a PEFT adapter needs), and
:meth:`ChainHistory.effective_rank` measures how much rank the chain reached.

Example:
    >>> import torch
    >>> from chainopt.history import ChainHistory, LinkFactors
    >>> h = ChainHistory(keep_factors=True)
    >>> a, b = torch.randn(2, 6), torch.randn(4, 2)
    >>> h.add(h.make_record(step=10, links={"fc": LinkFactors(a, b, 0.5)}, norms={"fc": 1.0}))
    >>> B, A = h.stacked("fc")
    >>> torch.allclose(B @ A, 0.5 * b @ a)
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ChainHistory",
    "KnotRecord",
    "LinkFactors",
]  # the public names (chainopt re-exports them); the rest is internal


@dataclass(frozen=True)
class LinkFactors:
    """One link of one module: ``scale·B·A`` and its bias delta (history keeps float32 copies).

    Attributes:
        A: the link's ``(r, in)`` factor.
        B: the link's ``(out, r)`` factor.
        scale: ``alpha / r``.
        bias: the bias delta merged with it (``None`` without ``lora_bias``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from chainopt import ChainLoRAOptimizer
        >>> model = nn.Sequential(nn.Linear(4, 3))
        >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                          target_modules=["0"], rank=2, alpha=4, knot_every=1,
        ...                          keep_history=True)
        >>> link = opt.tie_knot().links["0"]
        >>> tuple(link.B.shape), tuple(link.A.shape), link.scale, link.bias
        ((3, 2), (2, 4), 2.0, None)
    """

    A: Tensor
    B: Tensor
    scale: float
    bias: Tensor | None = None


@dataclass(frozen=True)
class KnotRecord:
    """What one knot merged.

    Attributes:
        step: the optimizer step after which the knot was tied.
        norms: ``‖s·B·A‖_F`` per module name.
        links: the merged factors per module name (empty when factors are not kept).
        skipped: modules whose link was dropped unmerged (non-finite, ``non_finite="skip"``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from chainopt import ChainLoRAOptimizer
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                          target_modules=["0"], rank=2, knot_every=1)
        >>> model(torch.randn(2, 4)).sum().backward()
        >>> opt.step()  # step 1 is a knot
        >>> record = opt.history.knots[-1]
        >>> record.step, list(record.norms), record.links, record.skipped
        (1, ['0'], {}, ())
    """

    step: int
    norms: dict[str, float]
    links: dict[str, LinkFactors] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()


class ChainHistory:
    """The knots tied so far, in order.

    Args:
        keep_factors: keep float32 copies of each merged link's factors on the CPU (what an
            exact adapter export of the chain reads; costs one link's factors of host memory
            per knot). Norms are always kept.

    Raises:
        TypeError: ``keep_factors`` is not a bool.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from chainopt import ChainLoRAOptimizer
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                          target_modules=["0"], rank=2, knot_every=1)
        >>> _ = opt.tie_knot(), opt.tie_knot()
        >>> [k.step for k in opt.history.knots], opt.history.keep_factors
        ([0, 0], False)
    """

    def __init__(self, keep_factors: bool = False) -> None:
        if not isinstance(keep_factors, bool):
            raise TypeError(f"keep_factors must be a bool, got {keep_factors!r}")
        self.keep_factors = keep_factors
        self.knots: list[KnotRecord] = []

    def __len__(self) -> int:
        return len(self.knots)

    def make_record(
        self,
        step: int,
        links: Mapping[str, LinkFactors],
        norms: Mapping[str, float],
        skipped: tuple[str, ...] = (),
    ) -> KnotRecord:
        """A knot's record, not yet added; with ``keep_factors`` the links are copied now.

        The copies are float32 and go to host memory in one transfer, so a chain trained on an
        accelerator keeps no history there.
        """
        kept = _host_copies(links) if self.keep_factors else {}
        return KnotRecord(step=step, norms=dict(norms), links=kept, skipped=tuple(skipped))

    def add(self, record: KnotRecord) -> None:
        """Add a knot's record (once the knot is tied)."""
        self.knots.append(record)

    def links(self, name: str) -> list[LinkFactors]:
        """The merged links of module ``name``, oldest first.

        Raises:
            RuntimeError: knots were tied and their factors not kept.
        """
        if not self.keep_factors and self.knots:
            raise RuntimeError("this chain keeps no factors (keep_history=False)")
        return [k.links[name] for k in self.knots if name in k.links]

    def stacked(
        self, name: str, pending: LinkFactors | None = None
    ) -> tuple[Tensor, Tensor] | None:
        """``(B, A)`` with ``B·A = Σᵢ sᵢ·Bᵢ·Aᵢ`` over the merged links (and ``pending``).

        ``B`` is ``(out, Σ rᵢ)`` with the scales folded in, ``A`` is ``(Σ rᵢ, in)``. ``None``
        when there is nothing to stack.
        """
        links = self.links(name) + ([pending] if pending is not None else [])
        if not links:
            return None
        b = torch.cat([link.B * link.scale for link in links], dim=1)
        a = torch.cat([link.A for link in links], dim=0)
        return b, a

    def bias_sum(self, name: str) -> Tensor | None:
        """``Σᵢ δᵢ``: the bias deltas merged into module ``name`` (``None`` if none were kept)."""
        deltas = [link.bias for link in self.links(name) if link.bias is not None]
        return torch.stack(deltas).sum(0) if deltas else None

    def effective_rank(
        self, name: str, pending: LinkFactors | None = None, tol: float = 1e-3
    ) -> int:
        """Rank of the accumulated update: singular values above ``tol·σ_max``.

        Computed from the stacked factors through two thin QRs, never the ``(out, in)`` matrix.
        """
        stacked = self.stacked(name, pending)
        if stacked is None:
            return 0
        b, a = stacked
        rb = torch.linalg.qr(b.double()).R  # (R, R)
        ra = torch.linalg.qr(a.double().T).R  # (R, R)
        s = torch.linalg.svdvals(rb @ ra.T)
        if s.numel() == 0 or s[0] == 0:
            return 0
        return int((s > tol * s[0]).sum())

    def state_dict(self) -> dict[str, Any]:
        """Explicit keys; tensors stay tensors."""
        return {
            "keep_factors": self.keep_factors,
            "knots": [
                {
                    "step": k.step,
                    "norms": dict(k.norms),
                    "skipped": list(k.skipped),
                    "links": {
                        n: {"A": f.A, "B": f.B, "scale": f.scale, "bias": f.bias}
                        for n, f in k.links.items()
                    },
                }
                for k in self.knots
            ],
        }


def parse_history(state: object) -> tuple[bool, list[KnotRecord]]:
    """``(keep_factors, knots)`` from a saved history, checked.

    Raises:
        ValueError: a missing key, a wrong type, or a factor that is not a 2-D float tensor with
            data (a meta tensor has none).
    """
    try:
        _expect(isinstance(state, Mapping), "not a mapping")
        keep = state["keep_factors"]  # type: ignore[index]
        _expect(isinstance(keep, bool), "keep_factors is not a bool")
        knots = []
        for k in state["knots"]:  # type: ignore[index]
            links = {}
            for n, f in k["links"].items():
                a, b, bias = f["A"], f["B"], f.get("bias")
                _expect(
                    _matrix(a) and _matrix(b) and a.shape[0] == b.shape[1],
                    f"factors of {n}: A (r, in) and B (out, r) must be 2-D float tensors with "
                    "data (not on the meta device)",
                )
                _expect(
                    bias is None
                    or (isinstance(bias, Tensor) and bias.dim() == 1 and not bias.is_meta),
                    f"bias of {n}: a 1-D tensor with data (not on the meta device)",
                )
                links[str(n)] = LinkFactors(a, b, float(f["scale"]), bias)
            norms = {str(n): float(v) for n, v in k["norms"].items()}
            step = k["step"]
            _expect(isinstance(step, int) and not isinstance(step, bool), "step is not an int")
            skipped = tuple(str(s) for s in k["skipped"])
            knots.append(KnotRecord(step=step, norms=norms, links=links, skipped=skipped))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"malformed chain history in the state dict: {err!r:.200}") from err
    return keep, knots


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(what)


def _matrix(t: object) -> bool:
    """A 2-D float tensor with data (not on the meta device)."""
    return isinstance(t, Tensor) and t.dim() == 2 and t.is_floating_point() and not t.is_meta


def _host_copies(links: Mapping[str, LinkFactors]) -> dict[str, LinkFactors]:
    """float32 CPU copies of ``links``, moved in one transfer per device (views of one buffer)."""
    tensors = [t for f in links.values() for t in (f.A, f.B, f.bias) if t is not None]
    if not tensors:
        return {}
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    host: dict[int, Tensor] = {}
    for where in by_device.values():
        flat = torch.cat([tensors[i].detach().reshape(-1).float() for i in where]).cpu()
        parts = torch.split(flat, [tensors[i].numel() for i in where])
        host.update((i, part.view(tensors[i].shape)) for i, part in zip(where, parts, strict=True))
    copies = iter(host[i] for i in range(len(tensors)))
    return {
        name: LinkFactors(
            next(copies), next(copies), f.scale, None if f.bias is None else next(copies)
        )
        for name, f in links.items()
    }
