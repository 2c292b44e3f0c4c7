"""Peak tensor memory of one training step, as two exact counts.

1. *resident*: every tensor an object graph holds, each storage counted once
   (:func:`reachable_tensors`, :func:`unique_bytes`): parameters, buffers, optimizer state,
   chainopt's merge residuals and chain history, PEFT's bookkeeping, the quantization state of
   4-bit weights (bitsandbytes keeps it on the weight: absmax, code);
2. *transient*: the peak of the bytes allocated inside the step and not yet freed
   (:func:`transient_peak_bytes`), replayed from the PyTorch profiler's allocation records.

Example:
    >>> t = torch.zeros(4)
    >>> unique_bytes([t, t[:2]])  # one storage
    16
    >>> transient_peak_bytes(lambda: torch.ones(1024).sum()) >= 4096
    True
"""

from __future__ import annotations

import gc
import types
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .timing import sync

__all__ = ["reachable_tensors", "transient_peak_bytes", "unique_bytes"]

_OPAQUE = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.CodeType,
    types.FrameType,
    str,
    bytes,
    int,
    float,
    complex,
    bool,
    type(None),
)


def reachable_tensors(*roots: object) -> list[torch.Tensor]:
    """Tensors reachable from ``roots`` through containers and instance attributes.

    Walks ``gc.get_referents``, not entering classes, functions, methods or
    modules (so it never wanders into globals). It stops at each tensor found, except that the
    Python attributes of a tensor subclass are walked too: a bitsandbytes ``Params4bit`` keeps
    its ``quant_state`` (absmax, code, nested statistics) there, and those bytes are the
    model's. (A plain tensor's ``__dict__`` is empty.)
    """
    seen: set[int] = set()
    found: list[torch.Tensor] = []
    todo = list(roots)
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
            attrs = getattr(obj, "__dict__", None)
            if attrs:
                todo.extend(attrs.values())
            continue
        if isinstance(obj, _OPAQUE):
            continue
        todo.extend(gc.get_referents(obj))
    return found


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once.

    Args:
        tensors: Any tensors (views of one storage count it once).

    Returns:
        The total ``nbytes`` of the distinct storages.
    """
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[(str(t.device), st.data_ptr())] = st.nbytes()
    return sum(seen.values())


def _walk(nodes: Iterable[Any]) -> Iterable[Any]:
    stack = list(nodes)
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children)


def transient_peak_bytes(fn: Callable[[], None], device: str = "cpu") -> int:
    """Peak of the bytes that ``fn`` allocated on ``device`` and had not yet freed.

    Uses the profiler's allocation records (address, signed size, timestamp). A free is counted
    only if its block was allocated inside the window, so blocks that existed before (and
    whose size the allocator may not know) never make the figure go negative.

    Args:
        fn: What to measure (one training step, one knot).
        device: The device whose allocations count.

    Returns:
        The peak, in bytes.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    gc.collect()
    with profile(activities=activities, profile_memory=True, record_shapes=False) as prof:
        fn()
        sync(device)
    events = []
    want = torch.device(device).type
    for node in _walk(prof.profiler.kineto_results.experimental_event_tree()):
        if node.tag != _EventType.Allocation:
            continue
        f = node.extra_fields
        if f.device.type != want:
            continue
        events.append((node.start_time_ns, f.id, f.ptr, f.alloc_size))
    events.sort()
    live: dict[int, int] = {}
    current = peak = 0
    for _t, _id, ptr, size in events:
        if size > 0:
            live[ptr] = size
            current += size
        else:
            got = live.pop(ptr, None)
            if got is not None:
                current -= got
        peak = max(peak, current)
    return peak
