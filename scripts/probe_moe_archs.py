"""Every mixture-of-experts causal LM of the installed transformers, chained, on tiny models.

For each model family whose modeling code holds experts and which has a ``…ForCausalLM`` on a
text config, a tiny model is built from that config (hidden 32, 2 layers, 4 experts, vocab 64,
seed 0) with transformers' default experts implementation and with ``"eager"``, and checked:

- ``all``: ``target_modules="all-linear"`` adapts every expert/router weight that is an
  ``nn.Linear``, and every other matrix weight it leaves frozen is among those its warning names
  (``chainopt.targets.left_out_weights``): ``ok``, or ``SILENT`` with the weights neither
  adapted nor named;
- ``tp``: ``target_parameters`` naming those left-out expert/router weights: training changes
  the loss and every link gets a gradient (``train``), a knot keeps the logits (``knot``, atol
  1e-5), ``merge_and_unload`` keeps them and leaves the plain classes and parameters
  (``merge``), an ``opt.state_dict()`` round trip resumes bitwise (``resume``), and
  ``export_peft_adapter`` reloads with ``PeftModel.from_pretrained`` to the trained logits or
  refuses before writing (``peft``: ``ok``, ``refused`` or the error).

One row per family and implementation, on lines starting with ``| ``. Run from the repository
root: ``HF_HUB_OFFLINE=1 python scripts/probe_moe_archs.py [family ...]``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import io
import re
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's chainopt
import transformers
from peft import PeftModel

from chainopt import ChainLoRAOptimizer, export_peft_adapter, merge_and_unload
from chainopt.advice import ChainLoRAWarning
from chainopt.targets import left_out_weights

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)
IDS = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
MOE = re.compile(r"expert|router|gate|moe|switch|mlp|ffn|block_sparse")

SMALL: dict[str, Any] = {
    "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 24,
    "expert_intermediate_size": 24, "shared_expert_intermediate_size": 24,
    "ffn_hidden_size": 48, "num_hidden_layers": 2, "num_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 4, "head_dim": 8, "num_experts": 4, "num_local_experts": 4,
    "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2, "moe_topk": 2,
    "top_k": 2, "n_shared_experts": 1, "moe_k": 2, "n_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 8, "max_position_embeddings": 64, "num_mtp_layers": 0,
    "num_nextn_predict_layers": 0, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "moe_layer_freq": 1,
    "tie_word_embeddings": False,
    "attn_layer_period": 1, "attn_layer_offset": 0, "expert_layer_period": 1,
    "expert_layer_offset": 0, "mamba_d_state": 4, "mamba_d_conv": 4, "mamba_expand": 2,
    "mamba_dt_rank": 4, "linear_num_value_heads": 2, "linear_num_key_heads": 2,
    "linear_key_head_dim": 8, "linear_value_head_dim": 8, "full_attention_interval": 2,
    "mamba_n_heads": 4, "mamba_d_head": 16, "layer_group_size": 2,
    "router_jitter_noise": 0.0,
    "attention_dropout": 0.0, "hidden_dropout": 0.0, "dropout": 0.0,
}  # fmt: skip

EXTRA: dict[str, dict[str, Any]] = {  # what a family needs beyond SMALL
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "zaya": {"num_experts_per_tok": 1},
    "longcat_flash": {"zero_expert_num": 2},
    "dots1": {"n_shared_experts": 1},
    "gemma4": {"vocab_size_per_layer_input": 64, "hidden_size_per_layer_input": 8,
               "enable_moe_block": True, "top_k_experts": 2},
    "mimo_v2_flash": {"head_dim": 24, "v_head_dim": 8, "num_key_value_heads": 2},
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"]},
    "qwen3_5_moe": {"layer_types": ["linear_attention", "full_attention"]},
    "qwen4_exp": {"layer_types": ["linear_attention", "full_attention"], "indexer_n_heads": 2,
                  "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 4,
                  "indexer_compress_ratio": 2},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},
    "kimi_linear": {"layer_types": ["linear_attention", "full_attention"]},
    "ergo": {"first_dense_intermediate_size": 48, "shared_intermediate_size": 24},
    "kolibri1_1": {"head_dim": 16, "index_num_heads": 1},
    "dbrx": {"d_model": 32, "n_heads": 4, "n_layers": 2, "max_seq_len": 64,
             "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 24, "moe_num_experts": 4, "moe_top_k": 2}},
}  # fmt: skip


def families() -> list[str]:
    root = Path(transformers.__file__).parent / "models"
    out = []
    for d in sorted(root.iterdir()):
        text = "".join(p.read_text() for p in d.glob("modeling_*.py"))
        if re.search(r"expert", text, re.I) and "ForCausalLM" in text:
            out.append(d.name)
    return out


def causal_lm(family: str) -> tuple[type, type] | None:
    """``(config class, causal LM class)``: the causal LM built from a text config."""
    module = importlib.import_module(f"transformers.models.{family}")
    names = [n for n in dir(module) if n.endswith("ForCausalLM")]
    for name in sorted(names, key=lambda n: ("Text" not in n, len(n))):
        cls = getattr(module, name)
        cfg = getattr(cls, "config_class", None)
        if cfg is not None and (not getattr(cfg, "sub_configs", None) or family in EXTRA):
            return cfg, cls
    return None


def fields(cfg: type) -> set[str]:
    names: set[str] = set()
    for klass in cfg.__mro__:
        names |= set(getattr(klass, "__annotations__", {}))
    if dataclasses.is_dataclass(cfg):
        names |= {f.name for f in dataclasses.fields(cfg)}
    return names


def builder(family: str, cfg_cls: type, lm_cls: type, impl: str | None) -> Callable[[], nn.Module]:
    known = fields(cfg_cls)
    kwargs = {k: v for k, v in SMALL.items() if k in known} | EXTRA.get(family, {})
    config = cfg_cls(**kwargs)
    if impl is not None:
        config._experts_implementation = impl

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = lm_cls(config)
        model.eval()  # dropout and router noise off: logits comparable
        return model

    return build


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def steps(model: nn.Module, opt: ChainLoRAOptimizer, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def is_frozen_matrix(model: nn.Module, name: str, p: torch.Tensor) -> bool:
    return p.dim() >= 2 and p.is_floating_point() and not p.requires_grad


def all_linear(model: nn.Module, **kwargs: Any) -> tuple[ChainLoRAOptimizer, list[str]]:
    """Chain ``model`` with ``"all-linear"``; the messages of chainopt's warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = ChainLoRAOptimizer(
            model, torch.optim.AdamW(model.parameters()), target_modules="all-linear", rank=2,
            knot_every=2, **kwargs,
        )  # fmt: skip
    return opt, [str(w.message) for w in caught if issubclass(w.category, ChainLoRAWarning)]


def check_all_linear(build: Callable[[], nn.Module]) -> tuple[str, str, list[str]]:
    """``(all-linear result, following its advice, expert/router weights left out)``.

    A frozen matrix weight (embeddings, convolutions and the output layer apart) is named when
    its module's qualified name, or its ``module.param`` suffix, is in a warning."""
    model = build()
    opt, messages = all_linear(model)
    text = " ".join(messages)
    named = [n for n, _ in left_out_weights(model)]
    adapted = set(opt.config.modules)
    plain = (nn.Embedding, nn.modules.conv._ConvNd)  # left out by design, not MoE weights
    skip = {id(p) for m in model.modules() if isinstance(m, plain) for p in m.parameters()}
    out_layer = model.get_output_embeddings()
    if out_layer is not None:
        skip |= {id(p) for p in out_layer.parameters()}
    silent = []
    for mname, module in model.named_modules():
        if ".parametrizations." in f".{mname}." or mname in adapted:
            continue
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}"
            if id(p) in skip or p.dim() < 2 or not p.is_floating_point() or p.requires_grad:
                continue
            suffix = ".".join(full.split(".")[-2:])
            if parametrize.is_parametrized(module, pname):
                continue
            if f"'{mname}'" not in text and f"'{full}'" not in text and f"'{suffix}'" not in text:
                silent.append(full)
    shapes = dict(model.named_parameters())
    moe_left = [
        n for n in named
        if MOE.search(n) and not re.search(r"bias|A_log|norm|\.fn$", n)
        and min(shapes[n].shape[-2:]) >= 2
    ]  # fmt: skip
    result = "SILENT " + ",".join(_short(silent)) if silent else "ok"
    # follow the advice: its target_parameters are taken, and nothing it could link is left
    advice = "-"
    found = re.search(r"add target_parameters=(\[[^\]]*\])", text)
    if found is not None:
        try:
            _opt, again = all_linear(build(), target_parameters=ast.literal_eval(found.group(1)))
            left = [m for m in again if "add target_parameters=" in m]
            advice = "ok" if not left else "LEFT " + left[0][:120]
        except (ValueError, TypeError) as err:
            advice = f"REFUSED {str(err)[:160]}"
    return result, advice, moe_left


def _short(names: list[str]) -> list[str]:
    return list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names))


def check_target_parameters(build: Callable[[], nn.Module], params: list[str]) -> list[str]:
    results = []
    original = {k: v.clone() for k, v in build().state_dict().items()}

    def chain(model: nn.Module) -> ChainLoRAOptimizer:
        return ChainLoRAOptimizer(
            model, torch.optim.AdamW(model.parameters(), lr=1e-2), target_parameters=params,
            rank=2, knot_every=2, keep_history=True, seed=3,
        )  # fmt: skip

    model = build()
    classes = {n: type(m) for n, m in model.named_modules()}
    names = [n for n, _ in model.named_parameters()]
    try:
        opt = chain(model)
    except (ValueError, TypeError) as err:
        return [f"refused: {type(err).__name__}: {str(err)[:160]}"]
    # train: the loss moves and every link gets a gradient
    loss0 = model(input_ids=IDS, labels=IDS).loss
    loss0.backward()
    no_grad = [
        r.name
        for r in opt.chain.records
        if r.link.lora_B.grad is None or not bool(r.link.lora_B.grad.abs().sum() > 0)
    ]
    opt.step()
    opt.zero_grad()
    losses = [loss0.item(), *steps(model, opt, 3)]
    moved = abs(losses[-1] - losses[0]) > 1e-4
    results.append("ok" if moved and not no_grad else f"FAIL moved={moved} nograd={no_grad[:2]}")
    # knots: explicit, with trained factors pending
    worst = 0.0
    for _ in range(2):
        steps(model, opt, 1)
        before = logits(model)
        opt.tie_knot()
        worst = max(worst, float((logits(model) - before).abs().max()))
    results.append("ok" if worst <= 1e-5 else f"FAIL {worst:.1e}")
    steps(model, opt, 1)  # a pending link
    trained = logits(model)
    # peft export (before merge; from the history)
    with tempfile.TemporaryDirectory() as d:
        where = Path(d) / "adapter"
        try:
            export_peft_adapter(opt, where)
        except (ValueError, TypeError) as err:
            peft = "refused" if not where.exists() else "FAIL wrote then refused"
            peft += f" ({str(err)[:100]})"
        else:
            try:
                loaded = PeftModel.from_pretrained(build(), where)
                gap = float((logits(loaded) - trained).abs().max())
                peft = "ok" if gap <= 1e-5 else f"FAIL gap {gap:.1e}"
            except Exception as err:
                peft = f"FAIL load {type(err).__name__}: {str(err)[:100]}"
    # merge_and_unload
    merge_and_unload(model)
    gap = float((logits(model) - trained).abs().max())
    plain = {n: type(m) for n, m in model.named_modules()} == classes and [
        n for n, _ in model.named_parameters()
    ] == names
    results.append("ok" if gap <= 1e-5 and plain else f"FAIL gap={gap:.1e} plain={plain}")
    # resume bitwise
    a = build()
    oa = chain(a)
    steps(a, oa, 3)
    buf = io.BytesIO()
    torch.save((a.state_dict(), oa.state_dict()), buf)
    steps(a, oa, 3)
    b = build()
    ob = chain(b)
    buf.seek(0)
    sd_m, sd_o = torch.load(buf, weights_only=True)
    b.load_state_dict(sd_m)
    ob.load_state_dict(sd_o)
    steps(b, ob, 3)
    sa, sb = a.state_dict(), b.state_dict()
    same = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    results.append("ok" if same else "FAIL")
    results.append(peft)
    del original
    return results


def probe(family: str) -> list[str]:
    found = causal_lm(family)
    if found is None:
        return [f"| {family} | - | no text causal LM | | | | | |"]
    cfg_cls, lm_cls = found
    rows = []
    for impl in (None, "eager"):
        label = impl or "default"
        try:
            build = builder(family, cfg_cls, lm_cls, impl)
            model = build()
        except Exception as err:
            rows.append(f"| {family} | {label} | build failed: {type(err).__name__}: {err} |")
            break
        n_params = sum(p.numel() for p in model.parameters())
        try:
            all_lin, advice, moe_left = check_all_linear(build)
            if moe_left:
                tp = check_target_parameters(build, moe_left)
            else:
                tp = ["(experts are nn.Linear)"]
            exp = _short(moe_left)
            rows.append(
                f"| {family} | {label} | {n_params} | {all_lin} | {advice} | {exp} | "
                + " | ".join(tp)
                + " |"
            )
        except Exception as err:
            tb = traceback.format_exc().strip().splitlines()[-3:]
            rows.append(f"| {family} | {label} | {n_params} | ERROR {type(err).__name__}: "
                        f"{str(err)[:200]} {tb} |")  # fmt: skip
    return rows


def main() -> None:
    chosen = sys.argv[1:] or families()
    print("| family | experts | params | all-linear | its advice | target_parameters | train "
          "| knot | merge | resume | peft |")  # fmt: skip
    for family in chosen:
        for row in probe(family):
            print(row, flush=True)


if __name__ == "__main__":
    main()
