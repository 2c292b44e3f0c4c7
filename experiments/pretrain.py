"""Experiment 6: pre-training a small Llama from a warm start, where rank binds (issue 21).

ReLoRA's protocol at a size one CPU core can run: a Llama built from ``LlamaConfig`` (hidden
256, 4 layers, 3.3M parameters, byte vocabulary) trained on the Python standard library's own
``.py`` files as bytes (5% of the files held out by a hash of their path), sequences of 128
bytes, batch 16, AdamW. A short full-rank **warm start** (200 steps) is shared by every arm of a
seed; each **arm** then trains ``steps`` (3,000) more steps from it with a linear warm-up and a
cosine decay: full-rank training, LoRA r on every linear projection, chains of rank-r links
(knots every N steps, ``reset="prune"`` or ``"full"``, :class:`chainopt.KnotWarmup`: ReLoRA's
jagged schedule) and the LoRA of a chain's total rank. Metric: held-out loss in nats per byte on
a fixed set of held-out sequences, every ``eval_every`` steps and a few steps after each knot.

The plan (:func:`next_runs`) is the pre-registered one of ``docs/results.md`` section 6: the gate
on seed 0 (LR grids, the chains, the references), then the 3-seed confirmation of the best chain
against LoRA r, the diagnostic variants, and, if a chain is ahead of LoRA r at the gate, the
link-length curve and references on 3 seeds.

Every arm checkpoints with :func:`chainopt.save_checkpoint` every ``ckpt_every`` steps, appends
its per-step losses and evaluations to ``curves/<run>.jsonl`` and writes ``runs/<run>.json`` when
done; a new invocation skips finished runs and resumes unfinished ones (bitwise the same numbers
on the same machine). Several drivers may share one ``--out`` (file locks). ``--time-limit``
makes a driver checkpoint and stop cleanly before the limit. ``pretrain_report.py`` builds the
tables and plots from whatever has finished.

Run (from the repository root):
    python experiments/pretrain.py --estimate-only --threads 1      # time steps, print budget
    nohup python experiments/pretrain.py --threads 1 --no-progress > .../driver.log 2>&1 &
    python experiments/pretrain.py --quick --out /tmp/pt            # tiny model, seconds
    bash experiments/gpu_pretrain.sh OUT                             # one GPU, 480 s
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

# this checkout's chainopt and experiments helpers, whatever the working directory
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from _runs import REPO_ROOT, claim, git_commit, read_jsonl, utc_now, write_json_atomic  # noqa: E402

from chainopt import ChainLoRAOptimizer, KnotWarmup, load_checkpoint, save_checkpoint  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "experiments" / "results" / "pretrain"
#: Every linear projection of every decoder layer: what LoRA and the chains adapt.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: Trained as they are by every arm (ReLoRA trains them fully): embeddings, norms, LM head.
TRAINED_AS_IS = ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm", "lm_head"]

# ------------------------------------------------------------------------------------- design


@dataclass(frozen=True)
class Design:
    """Everything that fixes the experiment; stored in every run's JSON and checked on resume."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 688
    seq_len: int = 128
    batch_size: int = 16
    heldout_mod: int = 20  # a file is held out when sha256(relative path) % 20 == 0 (≈ 5%)
    max_files: int = 0  # 0: every stdlib .py file (tests use a few)
    eval_seqs: int = 256
    eval_batch: int = 64
    warm_steps: int = 200
    warm_lr: float = 1e-3
    steps: int = 3000
    warmup: int = 50  # linear LR warm-up at each arm's start, and after each knot (KnotWarmup)
    min_lr_ratio: float = 0.1  # cosine decay to 10% of the peak
    clip: float = 1.0
    rank: int = 8
    alpha_scale: float = 2.0  # alpha = 2·√r: a rank-r link has scale 2/√r (rsLoRA)
    lora_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    lora_lr_ext: tuple[float, float] = (3e-4, 3e-2)  # run once if the best LR is at an edge
    full_lrs: tuple[float, ...] = (1e-3,)  # a reference, not tuned (the warm start's LR)
    full_lr_ext: tuple[float, float] = (3e-4, 3e-3)
    link_steps: tuple[int, ...] = (500, 1000, 1500)
    grid_link: int = 1000  # the chain whose LR is tuned; the other chains use its LR
    eval_every: int = 250
    after_knot: tuple[int, ...] = (50,)  # extra evaluations this many steps after a knot
    ckpt_every: int = 250
    seeds: tuple[int, ...] = (0, 1, 2)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: The tests' and ``--quick``'s design: a tiny Llama on a few files, seconds on one core.
TINY = Design(
    hidden=32,
    layers=2,
    heads=2,
    intermediate=64,
    seq_len=32,
    batch_size=4,
    max_files=40,
    eval_seqs=16,
    eval_batch=8,
    warm_steps=8,
    steps=24,
    warmup=3,
    rank=2,
    lora_lrs=(3e-3, 1e-2),
    lora_lr_ext=(1e-3, 3e-2),
    full_lrs=(3e-3,),
    full_lr_ext=(1e-3, 1e-2),
    link_steps=(6, 12),
    grid_link=12,
    eval_every=8,
    after_knot=(2,),
    ckpt_every=4,
    seeds=(0, 1),
)


@dataclass(frozen=True)
class Arm:
    """One training configuration after the warm start. ``kind`` is "full" or "lora"."""

    name: str
    kind: str
    rank: int = 0
    link_steps: int = 0  # 0: one link for the whole arm (plain LoRA)
    reset: str = "full"
    init: str = "kaiming"

    def knots(self, steps: int) -> list[int]:
        """The steps after which this arm ties a knot (every ``link_steps``, none at the end)."""
        return list(range(self.link_steps, steps, self.link_steps)) if self.link_steps else []

    def links(self, steps: int) -> int:
        return len(self.knots(steps)) + 1

    def total_rank(self, steps: int) -> int | None:
        return None if self.kind == "full" else self.rank * self.links(steps)


def full_arm() -> Arm:
    return Arm("full", "full")


def lora_arm(rank: int) -> Arm:
    return Arm(f"lora{rank}", "lora", rank)


def chain_arm(d: Design, link_steps: int, reset: str, init: str = "kaiming") -> Arm:
    suffix = "_grad" if init == "gradient" else ""
    return Arm(f"chain{link_steps}_{reset}{suffix}", "lora", d.rank, link_steps, reset, init)


def arm_by_name(name: str, d: Design) -> Arm:
    if name == "full":
        return full_arm()
    if name.startswith("lora"):
        return lora_arm(int(name[4:]))
    init = "gradient" if name.endswith("_grad") else "kaiming"
    steps, reset = name.removesuffix("_grad")[len("chain") :].split("_")
    return chain_arm(d, int(steps), reset, init)


# --------------------------------------------------------------------------------------- data


def stdlib_files(d: Design, root: Path | None = None) -> tuple[Path, list[str]]:
    """The stdlib folder and its ``.py`` files (relative POSIX paths, sorted; no site-packages)."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    names = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts and p.is_file()
    )
    if d.max_files:
        names = names[: d.max_files]
    return root, names


def held_out(name: str, d: Design) -> bool:
    """The file split: by a hash of the relative path, so a file keeps its side on any machine."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % d.heldout_mod == 0


@dataclass
class Data:
    train: torch.Tensor  # (n, seq_len) uint8: the training files' bytes packed into sequences
    heldout: torch.Tensor  # (eval_seqs, seq_len) uint8: the fixed evaluation set
    info: dict[str, Any]


def load_data(d: Design, root: Path | None = None) -> Data:
    """Pack the training files (concatenated in sorted order) into ``seq_len``-byte sequences."""
    root, names = stdlib_files(d, root)
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    listing = hashlib.sha256()
    content = hashlib.sha256()
    for name in names:
        raw = (root / name).read_bytes()
        parts[held_out(name, d)].append(raw)
        listing.update(f"{name}\t{len(raw)}\n".encode())
        content.update(raw)

    def pack(chunks: list[bytes]) -> torch.Tensor:
        blob = b"".join(chunks)
        n = len(blob) // d.seq_len
        return torch.frombuffer(bytearray(blob[: n * d.seq_len]), dtype=torch.uint8).view(
            n, d.seq_len
        )

    train, held = pack(parts[False]), pack(parts[True])
    if len(held) < d.eval_seqs:
        raise ValueError(f"only {len(held)} held-out sequences, eval_seqs={d.eval_seqs}")
    pick = torch.linspace(0, len(held) - 1, d.eval_seqs).round().long()
    info = {
        "stdlib": str(root),
        "python": platform.python_version(),
        "files": len(names),
        "heldout_files": sum(held_out(n, d) for n in names),
        "train_bytes": int(train.numel()),
        "heldout_bytes_available": int(held.numel()),
        "train_sequences": len(train),
        "eval_sequences": d.eval_seqs,
        "file_list_sha256": listing.hexdigest()[:16],
        "content_sha256": content.hexdigest()[:16],
    }
    return Data(train, held[pick].clone(), info)


def batch_indices(n: int, d: Design, seed: int) -> torch.Tensor:
    """The sequence indices of every step, warm start first: one seeded permutation (wrapped)."""
    need = (d.warm_steps + d.steps) * d.batch_size
    gen = torch.Generator().manual_seed(1000 + seed)
    perm = torch.randperm(n, generator=gen)
    reps = -(-need // n)
    return perm.repeat(reps)[:need].view(d.warm_steps + d.steps, d.batch_size)


# -------------------------------------------------------------------------------------- model


def build_model(d: Design, seed: int) -> nn.Module:
    """A fresh Llama (seeded init) with a byte vocabulary, float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=d.hidden,
        intermediate_size=d.intermediate,
        num_hidden_layers=d.layers,
        num_attention_heads=d.heads,
        num_key_value_heads=d.heads,
        max_position_embeddings=d.seq_len,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats per byte) over every position but the last."""
    ids = ids.long()
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: nn.Module, held: torch.Tensor, d: Design) -> float:
    """Held-out loss in nats per byte on the fixed evaluation set."""
    was = model.training
    model.eval()
    total = torch.zeros((), device=held.device)
    for start in range(0, len(held), d.eval_batch):
        chunk = held[start : start + d.eval_batch]
        total += lm_loss(model, chunk) * len(chunk)
    model.train(was)
    return float(total) / len(held)


def lr_factor(step: int, d: Design) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    warm = min(1.0, (step + 1) / d.warmup)
    cos = 0.5 * (1 + math.cos(math.pi * min(step, d.steps) / d.steps))
    return warm * (d.min_lr_ratio + (1 - d.min_lr_ratio) * cos)


def build_optimizer(
    model: nn.Module, arm: Arm, lr: float, seed: int, d: Design
) -> tuple[torch.optim.Optimizer, Any]:
    """The arm's optimizer and LR scheduler (the chains' wrapped in KnotWarmup)."""
    if arm.kind == "full":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, d))
        return opt, sched
    chain = ChainLoRAOptimizer(
        model,
        lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
        target_modules=TARGETS,
        trainable_modules=TRAINED_AS_IS,
        rank=arm.rank,
        alpha=d.alpha_scale * math.sqrt(arm.rank),
        # plain LoRA: one link for the whole arm (num_links=1 ties no knot)
        **(
            {"knots": arm.knots(d.steps)}
            if arm.knots(d.steps)
            else {"num_links": 1, "total_steps": d.steps}
        ),
        seed=seed,
        reset=arm.reset,  # type: ignore[arg-type]
        init=arm.init,  # type: ignore[arg-type]
        keep_history=True,  # chain_summary()'s effective rank of the summed update
    )
    inner = torch.optim.lr_scheduler.LambdaLR(chain, lambda s: lr_factor(s, d))
    if not arm.knots(d.steps):
        return chain, inner
    return chain, KnotWarmup(inner, chain, warmup_steps=d.warmup)


def adapted_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in TARGETS and hasattr(m, "weight")
    ]


def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapted projection's weight as the model uses it (base + pending link for LoRA)."""
    return {name: m.weight.detach().float().cpu().clone() for name, m in adapted_linears(model)}


def update_stats(delta: torch.Tensor) -> dict[str, float]:
    """Frobenius norm and effective ranks of one matrix's update (float64 SVD)."""
    s = torch.linalg.svdvals(delta.double())
    fro = float(s.square().sum().sqrt())
    if fro == 0.0:
        return {"fro": 0.0, "entropy_rank": 0.0, "rank90": 0, "stable_rank": 0.0}
    p = s / s.sum()
    p = p[p > 0]
    energy = s.square().cumsum(0) / s.square().sum()
    return {
        "fro": fro,
        "entropy_rank": float(torch.exp(-(p * p.log()).sum())),  # Roy & Vetterli (2007)
        "rank90": int((energy < 0.9).sum()) + 1,  # singular values holding 90% of ‖ΔW‖²
        "stable_rank": float(s.square().sum() / s[0].square()),
    }


# ------------------------------------------------------------------------------------- a run


class Stop(Exception):
    """``--stop-after-steps``: a simulated kill (no checkpoint is written at the stop)."""


class TimeUp(Exception):
    """The time limit (or ``--pause-after-steps``): the run was checkpointed, then stopped."""


def run_key(arm: Arm, lr: float, seed: int) -> str:
    return f"{arm.name}__lr{lr:g}__s{seed}"


def warm_key(seed: int) -> str:
    return f"warm__s{seed}"


@dataclass
class Context:
    d: Design
    out: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    data_root: Path | None = None
    deadline: float | None = None  # time.time() after which a driver checkpoints and stops
    stop_after: int | None = None  # simulated kill after this many steps (tests)
    pause_after: int | None = None  # clean stop after this many steps (tests)
    progress: bool = True
    verbose: bool = True
    steps_done_here: int = 0
    _data: Data | None = None
    _on_device: tuple[torch.Tensor, torch.Tensor] | None = None

    def data(self) -> Data:
        if self._data is None:
            self._data = load_data(self.d, self.data_root)
        return self._data

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Training and evaluation sequences on the device."""
        if self._on_device is None:
            data = self.data()
            self._on_device = (data.train.to(self.device), data.heldout.to(self.device))
        return self._on_device

    def after_step(self) -> str | None:
        """Why to stop now, if at all: "kill" (no save), "pause" (save), or None."""
        self.steps_done_here += 1
        if self.stop_after is not None and self.steps_done_here >= self.stop_after:
            return "kill"
        if self.pause_after is not None and self.steps_done_here >= self.pause_after:
            return "pause"
        if self.deadline is not None and time.time() >= self.deadline:
            return "pause"
        return None

    def log(self, text: str) -> None:
        if self.verbose:
            print(f"[{datetime.now(timezone.utc).strftime('%H:%M:%S')}] {text}", flush=True)


def _machine(ctx: Context) -> dict[str, Any]:
    dev = str(ctx.device)
    if ctx.device.type == "cuda":
        dev += f" ({torch.cuda.get_device_name(ctx.device)})"
    return {
        "device": dev,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def warm_start(ctx: Context, seed: int) -> dict[str, Any]:
    """Full-rank training for ``warm_steps`` from a seeded init; shared by every arm of ``seed``.

    Short enough to redo when interrupted (no checkpoint of its own); its weights go to
    ``ckpt/warm__s<seed>.pt`` and its evaluation to ``runs/warm__s<seed>.json``.
    """
    d, out = ctx.d, ctx.out
    key = warm_key(seed)
    path = out / "runs" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    train, held = ctx.tensors()
    order = batch_indices(len(train), d, seed).to(ctx.device)
    model = build_model(d, seed).to(ctx.device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=d.warm_lr, weight_decay=0.0)
    losses = []
    t0 = time.perf_counter()
    ctx.log(f"warm start, seed {seed}: {d.warm_steps} full-rank steps")
    for step in range(d.warm_steps):
        for g in opt.param_groups:  # linear warm-up, then constant
            g["lr"] = d.warm_lr * min(1.0, (step + 1) / d.warmup)
        loss = lm_loss(model, train[order[step]])
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), d.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    seconds = time.perf_counter() - t0
    eval_loss = evaluate(model, held, d)
    weights = out / "ckpt" / f"{key}.pt"
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_name(f".{weights.name}.{os.getpid()}.tmp")
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, weights)
    result = {
        "key": key,
        "seed": seed,
        "design": d.to_json(),
        "data": ctx.data().info,
        "eval_loss": eval_loss,
        "train_losses": [round(x, 5) for x in torch.stack(losses).tolist()],
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(seconds, 2),
        "git_commit": git_commit(),
        "date_utc": utc_now(),
        **_machine(ctx),
    }
    write_json_atomic(path, result)
    ctx.log(f"warm start, seed {seed}: held-out {eval_loss:.4f} nats/byte ({seconds:.0f} s)")
    return result


def warm_weights(ctx: Context, seed: int) -> dict[str, torch.Tensor]:
    path = ctx.out / "ckpt" / f"{warm_key(seed)}.pt"
    if not path.exists():  # the runs/ JSON survived but not the weights: redo, bitwise
        (ctx.out / "runs" / f"{warm_key(seed)}.json").unlink(missing_ok=True)
        warm_start(ctx, seed)
    return torch.load(path, map_location=ctx.device, weights_only=True)


def eval_steps(d: Design) -> set[int]:
    """Every ``eval_every`` steps, at every knot any arm ties, and ``after_knot`` steps after."""
    steps = set(range(d.eval_every, d.steps + 1, d.eval_every)) | {d.steps}
    knots = {k for n in d.link_steps for k in range(n, d.steps, n)}
    steps |= knots | {k + a for k in knots for a in d.after_knot if k + a <= d.steps}
    return steps


def train_arm(ctx: Context, arm: Arm, lr: float, seed: int, stage: str) -> dict[str, Any] | None:
    """Train one (arm, lr, seed) to the end, resuming from its checkpoint if there is one."""
    d, out = ctx.d, ctx.out
    key = run_key(arm, lr, seed)
    result_path = out / "runs" / f"{key}.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    train, held = ctx.tensors()
    warm = warm_weights(ctx, seed)
    warm_eval = json.loads((out / "runs" / f"{warm_key(seed)}.json").read_text())["eval_loss"]
    ckpt = out / "ckpt" / f"{key}.pt"
    curve_path = out / "curves" / f"{key}.jsonl"
    curve_path.parent.mkdir(parents=True, exist_ok=True)

    model = build_model(d, seed).to(ctx.device)
    model.load_state_dict(warm)
    model.train()
    w0 = effective_weights(model)
    opt, sched = build_optimizer(model, arm, lr, seed, d)
    chain = opt if isinstance(opt, ChainLoRAOptimizer) else None
    start, seconds, resumed = 0, 0.0, False
    if ckpt.exists():
        extra = load_checkpoint(ckpt, model, opt, map_location=ctx.device)
        sched.load_state_dict(extra["sched"])
        start, seconds, resumed = int(extra["step"]), float(extra["seconds"]), True
    rows = [r for r in read_jsonl(curve_path) if r["step"] <= start]
    if not rows:
        rows = [{"step": 0, "eval": warm_eval}]
    curve_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pending: list[dict[str, Any]] = []
    if chain is not None:

        def on_knot(o: ChainLoRAOptimizer, record: Any) -> None:
            norms = [v for v in record.norms.values()]
            pending.append(
                {
                    "step": record.step,
                    "knot": True,
                    "norm_mean": statistics.fmean(norms),
                    "norms": {k: round(v, 6) for k, v in record.norms.items()},
                }
            )

        chain.register_knot_hook(on_knot)
    order = batch_indices(len(train), d, seed)[d.warm_steps :].to(ctx.device)
    evals = eval_steps(d)
    params = [p for p in model.parameters() if p.requires_grad]
    ctx.log(f"{stage} {key}: {'resuming at step ' + str(start) if start else 'start'}")
    losses: list[torch.Tensor] = []
    diverged = False
    with curve_path.open("a") as curve:

        def flush(upto: int) -> bool:
            vals = torch.stack(losses).tolist() if losses else []
            first = upto - len(vals) + 1
            for i, v in enumerate(vals):
                curve.write(json.dumps({"step": first + i, "loss": round(v, 5)}) + "\n")
            for k in pending:
                curve.write(json.dumps(k) + "\n")
            losses.clear()
            pending.clear()
            curve.flush()
            return all(math.isfinite(v) for v in vals)

        bar = tqdm(
            range(start, d.steps), initial=start, total=d.steps, desc=key, unit="step",
            mininterval=30, disable=not ctx.progress, file=sys.stderr,
        )  # fmt: skip
        for step in bar:
            t0 = time.perf_counter()
            loss = lm_loss(model, train[order[step]])
            loss.backward()
            nn.utils.clip_grad_norm_(params, d.clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            done = step + 1
            why = ctx.after_step()
            seconds += time.perf_counter() - t0
            boundary = done in evals or done % d.ckpt_every == 0 or done == d.steps
            if boundary or why is not None:
                if not flush(done):
                    diverged = True
                    break
                if done in evals:
                    ev = evaluate(model, held, d)
                    curve.write(json.dumps({"step": done, "eval": ev}) + "\n")
                    curve.flush()
                    if not ctx.progress and done % d.eval_every == 0:
                        ctx.log(f"  {key} step {done}/{d.steps}: held-out {ev:.4f}")
                if why == "kill":
                    raise Stop(key)
                if (done % d.ckpt_every == 0 or why == "pause") and done < d.steps:
                    save_checkpoint(
                        ckpt, model, opt, step=done, seconds=seconds, sched=sched.state_dict()
                    )
                if why == "pause" and done < d.steps:
                    bar.close()
                    raise TimeUp(key)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
        bar.close()
    rows = read_jsonl(curve_path)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [(r["step"], r["eval"]) for r in rows if "eval" in r]
    w1 = effective_weights(model)
    per_module = {n: update_stats(w1[n] - w0[n]) for n in w0}
    update = {
        k: statistics.fmean(float(s[k]) for s in per_module.values())
        for k in ("fro", "entropy_rank", "rank90", "stable_rank")
    }
    summary: dict[str, Any] = {}
    if chain is not None:
        s = chain.chain_summary().to_dict()
        eff = [m["effective_rank"] for m in s["modules"].values()]
        summary = {
            "links": s["links"],
            "ranks": s["ranks"],
            "knot_steps": s["knot_steps"],
            "effective_rank_mean": statistics.fmean(eff) if None not in eff else None,
            "link_norm_mean": [
                statistics.fmean(m["update_norms"][i] for m in s["modules"].values())
                for i in range(len(s["knot_steps"]))
            ],
        }
        # the last (pending) link's own update: weight as used minus the merged base
        last = []
        for _, m in adapted_linears(model):
            base = m.parametrizations.weight.original.detach()  # type: ignore[union-attr]
            last.append(float((m.weight.detach() - base).float().norm()))
        summary["link_norm_mean"].append(statistics.fmean(last))
    final_eval = eval_rows[-1][1] if eval_rows and eval_rows[-1][0] == d.steps else math.inf
    result = {
        "key": key,
        "stage": stage,
        "arm": dataclasses.asdict(arm),
        "lr": lr,
        "seed": seed,
        "design": d.to_json(),
        "data": ctx.data().info,
        "final_eval": final_eval if not diverged else math.inf,
        "warm_eval": warm_eval,
        "final_train_loss": statistics.fmean(r["loss"] for r in train_rows[-100:])
        if train_rows
        else math.inf,
        "diverged": diverged,
        "evals": eval_rows,
        "update": update,
        "update_per_module": per_module,
        "chain": summary,
        "timing": {
            "train_seconds": round(seconds, 2),
            "s_per_step": round(seconds / max(1, len(train_rows)), 4),
            "resumed": resumed,
        },
        "git_commit": git_commit(),
        "date_utc": utc_now(),
        **_machine(ctx),
    }
    # a small, compressed copy of the curve for git; the plain one is dropped
    gz = curve_path.with_suffix(".jsonl.gz")
    with gzip.GzipFile(gz, "wb", mtime=0) as f:
        f.write(curve_path.read_bytes())
    write_json_atomic(result_path, result)
    curve_path.unlink()
    ckpt.unlink(missing_ok=True)
    ctx.log(
        f"done {key}: held-out {result['final_eval']:.4f} nats/byte, "
        f"{seconds:.0f} s ({result['timing']['s_per_step']} s/step)"
    )
    return result


def curve_rows(out: Path, key: str) -> list[dict[str, Any]]:
    """A run's curve rows, finished (``.jsonl.gz``) or in progress (``.jsonl``)."""
    gz = out / "curves" / f"{key}.jsonl.gz"
    if gz.exists():
        return [json.loads(x) for x in gzip.decompress(gz.read_bytes()).decode().splitlines()]
    return read_jsonl(out / "curves" / f"{key}.jsonl")


# ---------------------------------------------------------------------------------- the plan


def finished(out: Path) -> dict[str, dict[str, Any]]:
    runs = {}
    for p in sorted((out / "runs").glob("*.json")):
        r = json.loads(p.read_text())
        runs[r["key"]] = r
    return runs


def loss_of(r: dict[str, Any]) -> float:
    v = r["final_eval"]
    return v if math.isfinite(v) else math.inf


def grid(arm: Arm, runs: dict[str, dict[str, Any]], d: Design) -> list[float]:
    """The arm's LR grid on the first seed, plus the LR beyond an edge if the best sits there."""
    base = list(d.full_lrs if arm.kind == "full" else d.lora_lrs)
    ext = d.full_lr_ext if arm.kind == "full" else d.lora_lr_ext
    s0 = d.seeds[0]
    got = [runs.get(run_key(arm, lr, s0)) for lr in base]
    if any(g is None for g in got) or len(base) < 2:
        return base
    best = min(range(len(base)), key=lambda i: (loss_of(got[i]), base[i]))  # type: ignore[arg-type]
    if best == 0:
        return [ext[0], *base]
    if best == len(base) - 1:
        return [*base, ext[1]]
    return base


def best_lr(arm: Arm, runs: dict[str, dict[str, Any]], d: Design) -> float | None:
    """The grid LR with the lowest first-seed held-out loss, or None until the grid is done."""
    lrs = grid(arm, runs, d)
    got = [runs.get(run_key(arm, lr, d.seeds[0])) for lr in lrs]
    if any(g is None for g in got):
        return None
    return min(zip(lrs, got, strict=True), key=lambda t: (loss_of(t[1]), t[0]))[0]  # type: ignore[arg-type]


def gate_chains(d: Design) -> list[Arm]:
    return [chain_arm(d, n, "prune") for n in d.link_steps] + [chain_arm(d, d.grid_link, "full")]


def lr_rule(arm: Arm, d: Design) -> Arm:
    """Whose grid decides ``arm``'s LR: its own (grid arms), LoRA r's, or the grid chain's."""
    grid_chain = chain_arm(d, d.grid_link, "prune")
    if arm.kind == "full" or arm.name in (lora_arm(d.rank).name, grid_chain.name):
        return arm
    if arm.link_steps == 0:
        return lora_arm(d.rank)
    return grid_chain


def lr_of(arm: Arm, runs: dict[str, dict[str, Any]], d: Design) -> float | None:
    return best_lr(lr_rule(arm, d), runs, d)


def gate(runs: dict[str, dict[str, Any]], d: Design) -> dict[str, Any]:
    """The gate's verdict on the first seed, once every gate run is done."""
    s0 = d.seeds[0]
    lo = lora_arm(d.rank)
    lr_lo = lr_of(lo, runs, d)
    rows = {}
    for c in gate_chains(d):
        lr = lr_of(c, runs, d)
        r = runs.get(run_key(c, lr, s0)) if lr is not None else None
        rows[c.name] = None if r is None else loss_of(r)
    lo_run = runs.get(run_key(lo, lr_lo, s0)) if lr_lo is not None else None
    if lo_run is None or None in rows.values():
        return {"decided": False, "chains": rows}
    lo_loss = loss_of(lo_run)
    best = min(rows, key=lambda k: rows[k])  # type: ignore[arg-type,return-value]
    return {
        "decided": True,
        "lora": lo_loss,
        "chains": rows,
        "ahead": [k for k, v in rows.items() if v < lo_loss],  # type: ignore[operator]
        "best_chain": best,
    }


def plan(runs: dict[str, dict[str, Any]], d: Design) -> list[tuple[str, Arm, int]]:
    """Every (stage, arm, seed) the plan has decided on so far, in run order (LRs aside).

    1. gate: LoRA r's LR grid, the grid chain's LR grid, the other gate chains (first seed);
    2. confirm: LoRA r and the best gate chain on the other seeds;
    3. references on the first seed: full rank, and LoRA of the grid chain's total rank;
    4. diagnostic: the best chain with ``init="gradient"``, then with ``reset="none"``;
    5. only if a chain is ahead at the gate: the link-length curve (every link length, the best
       chain's reset), full rank, then the LoRA of each chain's total rank (the best chain's
       first), on every seed.
    """
    s0, rest = d.seeds[0], d.seeds[1:]
    lo = lora_arm(d.rank)
    grid_chain = chain_arm(d, d.grid_link, "prune")
    items: list[tuple[str, Arm, int]] = [("gate", lo, s0), ("gate", grid_chain, s0)]
    items += [("gate", c, s0) for c in gate_chains(d)]
    g = gate(runs, d)
    if g["decided"]:
        best = arm_by_name(g["best_chain"], d)
        items += [("confirm", a, s) for s in rest for a in (lo, best)]
    items += [("reference", full_arm(), s0)]
    items += [("reference", lora_arm(grid_chain.total_rank(d.steps) or d.rank), s0)]
    if g["decided"]:
        grad = chain_arm(d, best.link_steps, best.reset, "gradient")
        keep = chain_arm(d, best.link_steps, "none")
        items += [("diagnostic", grad, s0), ("diagnostic", keep, s0)]
        if g["ahead"]:
            curve = [chain_arm(d, n, best.reset) for n in d.link_steps]
            refs = [lora_arm(c.total_rank(d.steps) or d.rank) for c in curve]
            best_ref = lora_arm(best.total_rank(d.steps) or d.rank)
            # what the gap-closed figures need first: the curve, full rank, then the best
            # chain's own LoRA r*L on every seed; the other chains' LoRA r*L last, one rank on
            # every seed before the next (lowest first), so each finishes a paired comparison
            items += [("seeds", c, s) for s in rest for c in curve]
            items += [("seeds", full_arm(), s) for s in rest]
            items += [("seeds", best_ref, s) for s in d.seeds]
            refs.sort(key=lambda a: a.rank)
            items += [("seeds", r, s) for r in refs for s in d.seeds]
    seen: set[tuple[str, int]] = set()
    unique = []
    for stage, arm, seed in items:
        if (arm.name, seed) not in seen:
            seen.add((arm.name, seed))
            unique.append((stage, arm, seed))
    return unique


def next_runs(runs: dict[str, dict[str, Any]], d: Design) -> list[tuple[str, Arm, float, int]]:
    """What is runnable now, in order (warm starts are keyed ``warm__s<seed>``, arm None)."""
    todo: list[tuple[str, Arm, float, int]] = []
    for stage, arm, seed in plan(runs, d):
        if seed == d.seeds[0] and lr_rule(arm, d) is arm:
            lrs = [lr for lr in grid(arm, runs, d) if run_key(arm, lr, seed) not in runs]
            todo += [(stage, arm, lr, seed) for lr in lrs]
            continue
        lr = lr_of(arm, runs, d)
        if lr is not None and run_key(arm, lr, seed) not in runs:
            todo.append((stage, arm, lr, seed))
    # the two LR grids side by side (LoRA r, then the grid chain, at each LR in turn): a paired
    # comparison at one LR exists as early as possible; the order changes no result
    names = (lora_arm(d.rank).name, chain_arm(d, d.grid_link, "prune").name)
    grids = [t for t in todo if t[1].name in names and t[3] == d.seeds[0]]
    if grids:
        at = todo.index(grids[0])
        rest = [t for t in todo if t not in grids]
        lrs = list(d.lora_lrs)
        grids.sort(key=lambda t: lrs.index(t[2]) if t[2] in lrs else len(lrs))  # stable
        todo = rest[:at] + grids + rest[at:]
    return todo


# ------------------------------------------------------------------------------------ budget


def measure(ctx: Context, arm: Arm, n: int = 6) -> float:
    """Median seconds of a training step of ``arm`` (forward, backward, clip, optimizer)."""
    d = ctx.d
    train, _ = ctx.tensors()
    model = build_model(d, 0).to(ctx.device)
    opt, sched = build_optimizer(model, arm, 1e-3, 0, d)
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for step in range(n + 2):
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        lm_loss(model, train[step * d.batch_size : (step + 1) * d.batch_size]).backward()
        nn.utils.clip_grad_norm_(params, d.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def planned_steps(d: Design) -> dict[str, dict[str, int]]:
    """Arms of each stage of :func:`plan` (before any LR-edge extension)."""
    n_seeds = len(d.seeds)
    links = len(d.link_steps)
    return {
        "gate": {"lora_arms": 2 * len(d.lora_lrs) + len(gate_chains(d)) - 1, "full_arms": 0},
        "confirm": {"lora_arms": 2 * (n_seeds - 1), "full_arms": 0, "warm_starts": n_seeds - 1},
        "reference": {"lora_arms": 1, "full_arms": len(d.full_lrs)},
        "diagnostic": {"lora_arms": 2, "full_arms": 0},
        "seeds_if_ahead": {
            "lora_arms": (links - 1) * (n_seeds - 1) + links * n_seeds - 1,
            "full_arms": n_seeds - 1,
        },
    }


def estimate(ctx: Context) -> dict[str, Any]:
    """Time the step of each kind of arm and one evaluation here; the whole plan from that."""
    d = ctx.d
    t0 = time.perf_counter()
    ctx.data()
    t_data = time.perf_counter() - t0
    t = {
        "lora_r": measure(ctx, lora_arm(d.rank)),
        "chain": measure(ctx, chain_arm(d, d.grid_link, "prune")),
        "full": measure(ctx, full_arm()),
        "lora_rL": measure(ctx, lora_arm(d.rank * max(len(a.knots(d.steps)) + 1 for a in
                                                        gate_chains(d)))),
    }  # fmt: skip
    _, held = ctx.tensors()
    model = build_model(d, 0).to(ctx.device)
    evaluate(model, held, d)
    t1 = time.perf_counter()
    evaluate(model, held, d)
    t_eval = time.perf_counter() - t1
    n_evals = len(eval_steps(d))
    lora_arm_s = d.steps * t["chain"] + n_evals * t_eval + 5.0
    full_arm_s = d.steps * t["full"] + n_evals * t_eval + 5.0
    warm_s = d.warm_steps * t["full"] + t_eval
    stages = planned_steps(d)
    hours = {}
    for name, s in stages.items():
        sec = s["lora_arms"] * lora_arm_s + s["full_arms"] * full_arm_s
        sec += s.get("warm_starts", 0) * warm_s + (warm_s if name == "gate" else 0)
        hours[name] = round(sec / 3600, 2)
    return {
        "device": str(ctx.device),
        "threads": torch.get_num_threads(),
        "step_s": {k: round(v, 4) for k, v in t.items()},
        "eval_s": round(t_eval, 2),
        "evals_per_arm": n_evals,
        "data_load_s": round(t_data, 1),
        "arm_s": {"lora": round(lora_arm_s), "full": round(full_arm_s)},
        "arms": stages,
        "hours": hours,
        "hours_gate_and_confirm": round(hours["gate"] + hours["confirm"], 2),
        "hours_plan_no_chain_ahead": round(
            hours["gate"] + hours["confirm"] + hours["reference"] + hours["diagnostic"], 2
        ),
        "hours_plan_chain_ahead": round(sum(hours.values()), 2),
        "data": ctx.data().info,
        "date_utc": utc_now(),
    }


# ------------------------------------------------------------------------------------ driver


def drive(ctx: Context, max_runs: int | None = None, wait_s: float = 30.0) -> int:
    """Run whatever is runnable until nothing is left, ``max_runs`` finished, or time is up.

    Several drivers may share one ``--out``: each takes the first runnable run no other driver
    holds, and waits while every runnable run is held. Returns the runs finished here.
    """
    d = ctx.d
    done_here = 0
    design = json.loads(json.dumps(d.to_json()))
    while True:
        runs = finished(ctx.out)
        for r in runs.values():
            if r["design"] != design:
                raise SystemExit(f"{r['key']} was run with another design; use another --out")
        seeds_needed = {seed for _, _, _, seed in next_runs(runs, d)}
        warm = [s for s in sorted(seeds_needed) if warm_key(s) not in runs]
        todo: list[tuple[str, Arm | None, float, int]] = [("warm", None, 0.0, s) for s in warm]
        todo += [t for t in next_runs(runs, d) if t[3] not in warm]
        if not todo or (max_runs is not None and done_here >= max_runs):
            return done_here
        for stage, arm, lr, seed in todo:
            key = warm_key(seed) if arm is None else run_key(arm, lr, seed)
            handle = claim(ctx.out / "ckpt", key)
            if handle is None:
                continue
            with handle:
                if not (ctx.out / "runs" / f"{key}.json").exists():
                    if arm is None:
                        warm_start(ctx, seed)
                    else:
                        train_arm(ctx, arm, lr, seed, stage)
                        done_here += 1
            break
        else:
            if ctx.deadline is not None and time.time() + wait_s >= ctx.deadline:
                raise TimeUp("waiting")
            time.sleep(wait_s)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help=f"results folder ({DEFAULT_OUT})")
    p.add_argument("--quick", "--tiny", action="store_true", help="tiny Llama, few files, seconds")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the data and model move there)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds: checkpoint, stop")
    p.add_argument("--stop-margin", type=float, default=None, help="seconds kept for the stop")
    p.add_argument("--estimate-only", action="store_true", help="print the budget and stop")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    p.add_argument("--wait", type=float, default=None, help="seconds between looks for work")
    p.add_argument("--data-root", type=Path, default=None, help="another stdlib folder")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (logs)")
    p.add_argument("--quiet", action="store_true", help="no log lines either")
    p.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--pause-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)
    d = TINY if args.quick else Design()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no GPU")
    out = args.out or DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("ckpt/\ncurves/*.jsonl\n*.tmp\n")
    deadline = None
    if args.time_limit is not None:
        margin = args.stop_margin
        if margin is None:
            margin = min(30.0, 0.1 * args.time_limit)
        deadline = started + args.time_limit - margin
    ctx = Context(
        d,
        out,
        device=device,
        data_root=args.data_root,
        deadline=deadline,
        stop_after=args.stop_after_steps,
        pause_after=args.pause_after_steps,
        progress=not (args.no_progress or args.quiet),
        verbose=not args.quiet,
    )
    est_path = out / f"estimate_{device.type}.json"
    if args.estimate_only or not est_path.exists():
        est = estimate(ctx)
        write_json_atomic(est_path, est)
    else:
        est = json.loads(est_path.read_text())
    if not args.quiet:
        print("estimated compute:", json.dumps(est, indent=1), flush=True)
    if args.estimate_only:
        return 0
    wait = args.wait if args.wait is not None else (2.0 if device.type == "cuda" else 30.0)
    try:
        n = drive(ctx, args.max_runs, wait)
    except Stop as stop:
        ctx.log(f"stopped inside {stop} (--stop-after-steps)")
        return 3
    except TimeUp as up:
        ctx.log(f"time is up: stopped cleanly ({up}), checkpoint written; run again to resume")
        return 2
    runs = finished(out)
    write_json_atomic(out / "gate.json", gate(runs, d))
    ctx.log(f"{n} runs finished here, {len(runs)} in {out}; nothing left to run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
