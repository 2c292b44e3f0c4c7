"""Scoring label words with a causal LM: per-class log-likelihoods, accuracy, zero-shot.

:func:`score_label_words` gives the log-likelihood of every candidate label word after each
example's prompt; :func:`evaluate_label_words` turns it into accuracy (the evaluation of the
examples and experiments); :func:`zero_shot_report` prints SmolLM2's zero-shot accuracy on tasks.

Example (SmolLM2 on 200 StrategyQA questions)::

    model, tokenizer = load_smollm2()
    task = TASKS["strategyqa"]
    test = load_task("strategyqa", n_test=200)["test"]
    evaluate_label_words(model, tokenizer, test, task.template, task.label_words)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .models import load_smollm2
from .prompts import encode_prompt, label_word_token_ids
from .tasks import TASKS, load_task

__all__ = ["evaluate_label_words", "score_label_words", "zero_shot_report"]


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
    prompts = [encode_prompt(tokenizer, template, t, max_length - longest) for t in ds["text"]]
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


def zero_shot_report(tasks: Sequence[str], n_test: int, batch_size: int) -> None:
    """Print SmolLM2's zero-shot accuracy on ``tasks`` (``python examples/zero_shot.py``).

    Args:
        tasks: Names in :data:`chainopt_examples.tasks.TASKS`.
        n_test: Test examples per task (a seeded sample).
        batch_size: Sequences per forward pass.
    """
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
