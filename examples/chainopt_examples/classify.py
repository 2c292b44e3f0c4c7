"""A prompt-classification task ready for a training loop: its batches and its test accuracy.

:meth:`PromptData.load` reads a task of :data:`chainopt_examples.tasks.TASKS`, encodes its
training split as prompt + label word (:func:`chainopt_examples.prompts.build_prompt_dataset`)
in seeded batches, and keeps the test split for :meth:`PromptData.accuracy`.

Example (BBC News on a tiny random OPT)::

    model, tokenizer = load_model("tiny-opt")
    data = PromptData.load("bbc_news", tokenizer, n_train=16, n_test=24, batch_size=4,
                           max_length=64, seed=0)
    for batch in data.batches:
        model(**data.inputs(batch)).loss.backward()
    data.accuracy(model, tokenizer)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .prompts import PromptCollator, PromptTask, build_prompt_dataset, prompt_batches
from .scoring import evaluate_label_words
from .tasks import TASKS, load_task

__all__ = ["PromptData"]


@dataclass(frozen=True)
class PromptData:
    """A task's training batches and test split.

    Attributes:
        task: The prompt and label words.
        batches: One epoch of training batches (``input_ids``, ``attention_mask``, ``labels``,
            ``label``), in a seeded order.
        test: Test split with ``text`` and ``label``.
        n_train: Training examples.
        max_length: Longest sequence in tokens, label word included (texts are cut to fit).
    """

    task: PromptTask
    batches: list[dict[str, torch.Tensor]]
    test: Dataset
    n_train: int
    max_length: int

    @classmethod
    def load(
        cls,
        name: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        n_train: int,
        n_test: int,
        batch_size: int,
        max_length: int | None,
        seed: int,
    ) -> PromptData:
        """Load task ``name``, encode its training split and batch it.

        Args:
            name: A key of :data:`chainopt_examples.tasks.TASKS`.
            tokenizer: Tokenizer of the model to train.
            n_train: Training examples (a seeded sample).
            n_test: Test examples (a seeded sample).
            batch_size: Examples per batch.
            max_length: Longest sequence in tokens; ``None``: the task's own.
            seed: Seed of the split, the samples and the batch order.

        Returns:
            The task's data.
        """
        task = TASKS[name]
        length = max_length or task.max_length
        data = load_task(name, n_train=n_train, n_test=n_test, seed=seed)
        train = build_prompt_dataset(
            data["train"], tokenizer, task.template, task.label_words, length
        )
        collate = PromptCollator(tokenizer.pad_token_id)
        batches = prompt_batches(train, collate, batch_size, seed)
        return cls(task, batches, data["test"], len(data["train"]), length)

    @staticmethod
    def inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's inputs of a batch: everything but the class index ``label``."""
        return {k: v for k, v in batch.items() if k != "label"}

    def accuracy(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> float:
        """Test accuracy of picking the most likely label word.

        Args:
            model: A causal LM.
            tokenizer: Its tokenizer.

        Returns:
            Fraction of test examples whose right label word scores highest.
        """
        return evaluate_label_words(
            model,
            tokenizer,
            self.test,
            self.task.template,
            self.task.label_words,
            max_length=self.max_length,
        )
