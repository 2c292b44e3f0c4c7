"""Shared code of the chainopt benchmarks: models, variants, the alternating timer, memory, tables.

Every script builds ONE base model per (architecture, size) from a config and a seed, deep-copies
it into each variant (full fine-tuning, PEFT LoRA, chainopt without a knot, chainopt with a knot
every K steps), and runs the variants step by step in rotation (A B C, B C A, C A B, …) inside one
process, so that whatever else the machine is doing hits all of them alike. Medians are taken
over the timed steps; ratios are against PEFT LoRA with the same targets.

Peak tensor memory is measured with the PyTorch profiler (``profile_memory=True``): every
allocation and free made by PyTorch's allocator during one steady training step is recorded with
its address and size; the peak of the bytes allocated inside that step and still alive is added to
the bytes resident when the step starts (parameters, buffers and optimizer state, counted
tensor by tensor, each storage once; gradients are ``None`` then). See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# c10 warns once per 1000 frees of blocks allocated before profiling started: harmless here.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

import warnings

import torch
from torch import nn

# PEFT calls a transformers API that transformers 5 deprecates; not ours to fix.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

import chainopt  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "bench" / "results"

TARGETS: dict[str, dict[str, list[str]]] = {
    "llama": {
        "qv": ["q_proj", "v_proj"],
        "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
    "opt": {
        "qv": ["q_proj", "v_proj"],
        "all": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    },
}
TARGET_LABEL = {"qv": "q,v", "all": "all-linear"}


# ---------------------------------------------------------------------------------------------
# models and data
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A decoder built from config: ``arch`` is ``"llama"`` or ``"opt"``."""

    arch: str
    hidden: int = 512
    layers: int = 6
    seq: int = 256
    batch: int = 4
    vocab: int = 8192
    head_dim: int = 64

    @property
    def heads(self) -> int:
        return max(1, self.hidden // self.head_dim)

    def label(self) -> str:
        return f"{self.arch} h{self.hidden} L{self.layers} seq{self.seq} b{self.batch}"


def build_model(
    spec: ModelSpec, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> nn.Module:
    """A randomly initialised causal LM (dropout 0, no KV cache), in train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    if spec.arch == "llama":
        # Llama's MLP ratio (8/3·h rounded up to a multiple of 32), as in the 7B model (11008).
        inter = int(math.ceil(spec.hidden * 8 / 3 / 32) * 32)
        cfg = LlamaConfig(
            vocab_size=spec.vocab,
            hidden_size=spec.hidden,
            intermediate_size=inter,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.heads,
            max_position_embeddings=max(2048, spec.seq),
            use_cache=False,
            tie_word_embeddings=False,
        )
        model: nn.Module = LlamaForCausalLM(cfg)
    elif spec.arch == "opt":
        cfg = OPTConfig(
            vocab_size=spec.vocab,
            hidden_size=spec.hidden,
            word_embed_proj_dim=spec.hidden,
            ffn_dim=4 * spec.hidden,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            max_position_embeddings=max(2048, spec.seq),
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            layerdrop=0.0,
            use_cache=False,
        )
        model = OPTForCausalLM(cfg)
    else:
        raise ValueError(f"unknown arch {spec.arch!r} (llama or opt)")
    return model.to(device=device, dtype=dtype).train()


def make_batches(
    spec: ModelSpec, n: int = 4, seed: int = 1234, device: str = "cpu"
) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of random token ids (labels = inputs): the same ones for every variant."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, spec.vocab, (spec.batch, spec.seq), generator=g)
        out.append({"input_ids": ids.to(device), "labels": ids.to(device)})
    return out


# ---------------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One way of training a copy of the base model; :meth:`step` is one full training step."""

    name: str
    kind: str  # full | peft | chain | chain_knot
    targets: str | None
    model: nn.Module
    opt: torch.optim.Optimizer
    chain: chainopt.ChainLoRAOptimizer | None = None
    forward: Callable[..., Any] | None = None
    compiled: bool = False
    step_times: list[float] = field(default_factory=list)  # every timed step (wall, s)
    cpu_times: list[float] = field(default_factory=list)  # process CPU time of the same steps
    knot_step_times: list[float] = field(default_factory=list)  # the timed steps that tied a knot
    knot_times: list[float] = field(default_factory=list)  # tie_knot() alone (wall, s)
    knot_cpu_times: list[float] = field(default_factory=list)
    compiles_after_warmup: int = 0  # dynamo frames compiled during this variant's timed steps
    compiles_after_knot: int = 0  # … during the first step after each knot
    opt_state_bytes: int = 0  # largest optimizer state seen after a step
    results: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.forward is None:
            self.forward = self.model
        if self.chain is not None:
            # Time every knot the schedule ties inside step(): step() calls self.tie_knot(), so an
            # instance attribute wrapping the bound method sees exactly the knots of the schedule.
            inner = self.chain.tie_knot

            def timed_knot() -> None:
                sync(self.device)
                c0 = time.process_time()
                t0 = time.perf_counter()
                inner()
                sync(self.device)
                self.knot_times.append(time.perf_counter() - t0)
                self.knot_cpu_times.append(time.process_time() - c0)

            self.chain.tie_knot = timed_knot  # type: ignore[method-assign]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        assert self.forward is not None
        loss = self.forward(**batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def optimizer_state_bytes(self) -> int:
        return _unique_bytes(
            v for s in self.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        )

    def resident_bytes(self) -> int:
        """Every tensor the model and the optimizer hold, each storage counted once.

        Parameters, buffers, gradients, optimizer state, and whatever else hangs off the two
        objects: chainopt's merge residuals, its chain history (float32 copies of merged
        links), PEFT's bookkeeping. Found by walking the object graph from both roots.
        """
        tensors = reachable_tensors(self.model, self.opt)
        grads = [t.grad for t in tensors if t.grad is not None]
        return _unique_bytes([*tensors, *grads])

    def held_bytes(self) -> dict[str, int]:
        """What :meth:`resident_bytes` counts, split: model, optimizer state, the rest."""
        model = _unique_bytes(reachable_tensors(self.model))
        state = _unique_bytes(
            v for s in self.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        )
        residual = _unique_bytes(
            b for name, b in self.model.named_buffers() if name.endswith("merge_residual")
        )
        return {
            "model": model,
            "opt_state": state,
            "other": self.resident_bytes() - model - state,
            "merge_residual": residual,  # part of "model": chainopt's exact-merge buffers
        }


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

    Walks ``gc.get_referents`` breadth-first, not entering classes, functions, methods or
    modules (so it never wanders into globals), and stops at each tensor found.
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
            continue
        if isinstance(obj, _OPAQUE):
            continue
        todo.extend(gc.get_referents(obj))
    return found


def _unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[(str(t.device), st.data_ptr())] = st.nbytes()
    return sum(seen.values())


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-4
    knot_every: int = 5
    exact_merge: bool | None = None  # chainopt's default: a merge residual for half weights
    keep_history: bool | None = None  # None: chainopt's default (no history)


NO_KNOT = 10**9  # chainopt needs a schedule; this one never fires inside a benchmark


def make_full(base: nn.Module, lora: LoraSpec) -> Variant:
    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(model.parameters(), lr=lora.lr)
    return Variant("full FT", "full", None, model, opt)


def make_peft(base: nn.Module, arch: str, targets: str, lora: LoraSpec) -> Variant:
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
    base: nn.Module,
    arch: str,
    targets: str,
    lora: LoraSpec,
    knot_every: int | None,
    forward: Callable[[nn.Linear, torch.Tensor], torch.Tensor] | None = None,
) -> Variant:
    """chainopt over a copy of ``base``; ``forward`` replaces the adapted Linears' forward.

    chainopt installs its forward on the class ``parametrize`` made for each adapted module, so
    replacing it there touches this variant's modules only.
    """
    model = copy.deepcopy(base)
    schedule: dict[str, Any] = {"knot_every": knot_every} if knot_every else {"knots": [NO_KNOT]}
    opt = chainopt.ChainLoRAOptimizer(
        model,
        torch.optim.AdamW(model.parameters(), lr=lora.lr),
        target_modules=TARGETS[arch][targets],
        rank=lora.rank,
        alpha=lora.alpha,
        exact_merge=lora.exact_merge,
        **schedule,
        **({} if lora.keep_history is None else {"keep_history": lora.keep_history}),
    )
    if forward is not None:
        for _name, module in opt.adapted_modules():
            type(module).forward = forward  # type: ignore[method-assign]
    if knot_every:
        return Variant(
            f"chainopt {TARGET_LABEL[targets]} knot/{knot_every}",
            "chain_knot",
            targets,
            model,
            opt,
            chain=opt,
        )
    return Variant(f"chainopt {TARGET_LABEL[targets]}", "chain", targets, model, opt, chain=opt)


def make_variants(
    base: nn.Module,
    arch: str,
    targets: Sequence[str],
    lora: LoraSpec,
    kinds: Sequence[str] = ("full", "peft", "chain", "chain_knot"),
    chain_forward: Callable[[nn.Linear, torch.Tensor], torch.Tensor] | None = None,
) -> list[Variant]:
    """Full FT once, then PEFT / chainopt / chainopt-with-knots for each target set."""
    out: list[Variant] = []
    if "full" in kinds:
        out.append(make_full(base, lora))
    for t in targets:
        if "peft" in kinds:
            out.append(make_peft(base, arch, t, lora))
        if "chain" in kinds:
            out.append(make_chain(base, arch, t, lora, None, chain_forward))
        if "chain_knot" in kinds:
            out.append(make_chain(base, arch, t, lora, lora.knot_every, chain_forward))
    return out


# ---------------------------------------------------------------------------------------------
# torch.compile bookkeeping
# ---------------------------------------------------------------------------------------------
def dynamo_counts() -> dict[str, int]:
    """Snapshot of dynamo's counters: frames compiled, graphs, graph breaks, recompiles."""
    from torch._dynamo.utils import counters

    return {
        # every frame dynamo was asked to compile (a first compile or a recompile)
        "frames": int(counters["frames"]["total"]),
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def count_diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def compile_variant(v: Variant, **kwargs: Any) -> None:
    v.forward = torch.compile(v.model, **kwargs)
    v.compiled = True


def configure_dynamo(limit: int = 64) -> None:
    import torch._dynamo.config as dc

    # Several model copies of one class are compiled in one process: each may add a cache entry
    # on the same code objects. Raise the limit so none of them falls back to eager.
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), limit))


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_alternating(
    variants: Sequence[Variant],
    batches: Sequence[dict[str, torch.Tensor]],
    warmup: int,
    steps: int,
    desc: str = "",
    on_warm: Callable[[Variant], None] | None = None,
) -> None:
    """Warm each variant up (one after the other), then time ``steps`` rotations.

    Round ``i`` runs the variants in the order rotated by ``i``, so no variant always follows
    the same one. Python's GC is held off inside a round and run between rounds. For compiled
    variants, any frame dynamo compiles during a timed step is charged to that variant (and,
    if the step follows a knot, to ``compiles_after_knot``).
    """
    from tqdm.auto import tqdm

    n = len(variants)
    for v in variants:
        for w in range(warmup):
            v.step(batches[w % len(batches)])
        sync(v.device)
        if on_warm is not None:
            on_warm(v)
        for xs in (v.step_times, v.cpu_times, v.knot_step_times, v.knot_times, v.knot_cpu_times):
            xs.clear()
        v.compiles_after_warmup = v.compiles_after_knot = 0
        v.opt_state_bytes = v.optimizer_state_bytes()
    gc.collect()
    after_knot = {id(v): False for v in variants}
    for i in tqdm(range(steps), desc=desc or "steps", leave=False, file=sys.stderr):
        batch = batches[(warmup + i) % len(batches)]
        order = [variants[(i + j) % n] for j in range(n)]
        gc.disable()
        try:
            for v in order:
                knots_before = v.chain.knots_tied if v.chain is not None else 0
                frames_before = dynamo_counts()["frames"] if v.compiled else 0
                sync(v.device)
                c0 = time.process_time()
                t0 = time.perf_counter()
                v.step(batch)
                sync(v.device)
                dt = time.perf_counter() - t0
                dc = time.process_time() - c0
                v.step_times.append(dt)
                v.cpu_times.append(dc)
                if v.compiled:
                    new = dynamo_counts()["frames"] - frames_before
                    v.compiles_after_warmup += new
                    if after_knot[id(v)]:
                        v.compiles_after_knot += new
                knotted = v.chain is not None and v.chain.knots_tied != knots_before
                if knotted:
                    v.knot_step_times.append(dt)
                after_knot[id(v)] = knotted
                if not knotted:
                    v.opt_state_bytes = max(v.opt_state_bytes, v.optimizer_state_bytes())
        finally:
            gc.enable()
        gc.collect()


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
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


def measure_memory(v: Variant, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Resident bytes at the start of a steady step, the step's transient peak, and their sum.

    The measured step is an ordinary one: not a knot, not the first step after a knot (which
    allocates the fresh optimizer state of the new link).
    """
    v.step(batch)  # steady state: optimizer state exists, gradients are None
    if v.chain is not None:
        due = v.chain.schedule.is_due
        for _ in range(8):  # with knots every 1 or 2 steps there is no such step: give up
            if not (due(v.chain.optimizer_steps) or due(v.chain.optimizer_steps + 1)):
                break
            v.step(batch)
    gc.collect()
    resident = v.resident_bytes()
    if v.device.type == "cuda":
        # On CUDA the caching allocator keeps exact statistics: use them.
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        v.step(batch)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
    else:
        peak = transient_peak_bytes(lambda: v.step(batch), str(v.device))
    return {"resident": resident, "transient": peak, "peak": resident + peak}


# ---------------------------------------------------------------------------------------------
# summaries and tables
# ---------------------------------------------------------------------------------------------
def median_ms(xs: Sequence[float]) -> float:
    return 1e3 * statistics.median(xs) if xs else float("nan")


def mean_ms(xs: Sequence[float]) -> float:
    return 1e3 * statistics.fmean(xs) if xs else float("nan")


def iqr_ms(xs: Sequence[float]) -> float:
    if len(xs) < 4:
        return float("nan")
    q = statistics.quantiles(xs, n=4)
    return 1e3 * (q[2] - q[0])


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> tuple[float, float, float]:
    """Median of the per-round ratios ``num[i] / den[i]`` and a ~95% interval for it.

    Steps ``i`` of two variants ran in the same round, seconds apart, so their ratio cancels
    slow drift of the machine. The interval is the distribution-free one for a median: order
    statistics ``n/2 ∓ 0.98·√n`` of the sorted ratios.
    """
    ratios = sorted(a / b for a, b in zip(num, den, strict=False))
    n = len(ratios)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    half = 0.98 * math.sqrt(n)
    lo = max(0, math.floor(n / 2 - half))
    hi = min(n - 1, math.ceil(n / 2 + half) - 1)
    return statistics.median(ratios), ratios[lo], ratios[hi]


def mib(n: float) -> float:
    return n / 2**20


def fmt(x: Any, spec: str = ".2f") -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isnan(x):
        return "–"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def machine_info() -> dict[str, Any]:
    import peft
    import transformers

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "chainopt": chainopt.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_model": _cpu_model(),
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def save_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def common_args(parser: argparse.ArgumentParser) -> None:
    """Flags every script takes."""
    parser.add_argument("--quick", action="store_true", help="tiny config, few steps (< 1 min)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where results go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--knot-every", type=int, default=5, help="K of the knot variant")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1; 0: all CPU cores). On a shared machine one "
        "thread gives far steadier step times: see bench/README.md",
    )


def apply_threads(n: int | None) -> None:
    torch.set_num_threads(n or os.cpu_count() or 1)
    # torch.compile'd CPU kernels read the same setting when they are built.
