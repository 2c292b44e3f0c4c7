"""Prompt-based classification as in MeZO / COLA: prompts, label words, training batches.

A :class:`PromptTask` phrases a classification task for a causal LM: ``template.format(text=...)``
followed by the label word of the class. :func:`build_prompt_dataset` turns ``(text, label)``
rows into causal-LM examples whose loss covers only the label word; :class:`PromptCollator` pads
them into batches and :func:`prompt_batches` makes a seeded epoch of batches.

Example:
    >>> collate = PromptCollator(pad_token_id=0)
    >>> batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, -100, 7], "label": 1},
    ...                  {"input_ids": [5, 8], "labels": [-100, 8], "label": 0}])
    >>> batch["input_ids"].tolist(), batch["label"].tolist()
    ([[5, 6, 7], [5, 8, 0]], [1, 0])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:  # imported where used: encoding prompts needs no ``datasets``
    from datasets import Dataset, DatasetDict

__all__ = [
    "PromptCollator",
    "PromptTask",
    "build_prompt_dataset",
    "encode_prompt",
    "label_word_token_ids",
    "prompt_batches",
]


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


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, template: str, text: str, max_prompt_tokens: int
) -> list[int]:
    """Tokenize ``template.format(text=text)``, shortening ``text`` to fit.

    Only the text is cut (from its end, marked with ``" ..."``), so the instructions and the
    ``Answer:`` cue that the label word follows always survive.

    Args:
        tokenizer: The tokenizer.
        template: Prompt with a ``{text}`` placeholder.
        text: The example's text.
        max_prompt_tokens: Longest prompt, in tokens.

    Returns:
        The prompt's token ids, at most ``max_prompt_tokens`` of them.

    Raises:
        ValueError: The template alone is longer than ``max_prompt_tokens``.
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
        template: Prompt with a ``{text}`` placeholder (see :data:`chainopt_examples.tasks.TASKS`).
        label_words: One word per class, in label-index order.
        max_length: Longest sequence, in tokens, label word included.

    Returns:
        The same kind of object with columns ``input_ids``, ``attention_mask`` and
        ``labels`` (token ids) and ``label`` (class index, kept for evaluation).
    """
    from datasets import DatasetDict

    words = label_word_token_ids(tokenizer, label_words)

    def encode(row: dict[str, Any]) -> dict[str, list[int]]:
        target = words[row["label"]]
        prompt = encode_prompt(tokenizer, template, row["text"], max_length - len(target))
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


def prompt_batches(
    ds: Dataset, collate: PromptCollator, batch_size: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """One epoch of batches of ``ds`` in a seeded random order (the same for every run).

    Args:
        ds: Examples from :func:`build_prompt_dataset`.
        collate: Pads rows into a batch.
        batch_size: Rows per batch (the last batch may be smaller).
        seed: Seed of the order.

    Returns:
        The batches, each a dict of ``(batch, longest)`` tensors (and ``label``, ``(batch,)``).
    """
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [ds[i] for i in order]
    return [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
