"""The task's data: fictional people's facts, their tokens and batches, the forgetting probe.

Example:
    >>> facts = build_facts(2, seed=0)
    >>> len(facts), facts[0][1].startswith(" ")
    (8, True)
"""

from __future__ import annotations

import hashlib
import platform
import random
import statistics
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .design import Design

__all__ = [
    "RELATIONS",
    "Batch",
    "ByteTokenizer",
    "build_facts",
    "chance_recall",
    "collate",
    "data_order",
    "encode",
    "probe_tokens",
]

_CITIES = [
    "Paris",
    "London",
    "Tokyo",
    "Berlin",
    "Madrid",
    "Rome",
    "Cairo",
    "Lima",
    "Oslo",
    "Vienna",
    "Prague",
    "Dublin",
    "Lisbon",
    "Athens",
    "Moscow",
    "Delhi",
    "Seoul",
    "Sydney",
    "Toronto",
    "Chicago",
    "Boston",
    "Denver",
    "Miami",
    "Dallas",
]
_JOBS = [
    "doctor",
    "teacher",
    "lawyer",
    "farmer",
    "pilot",
    "nurse",
    "chef",
    "baker",
    "painter",
    "writer",
    "singer",
    "dancer",
    "plumber",
    "banker",
    "soldier",
    "sailor",
]
_COLOURS = [
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "pink",
    "brown",
    "black",
    "white",
    "grey",
    "gold",
]
_INSTRUMENTS = [
    "piano",
    "guitar",
    "violin",
    "drums",
    "flute",
    "cello",
    "trumpet",
    "harp",
    "banjo",
    "organ",
    "clarinet",
]
RELATIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("{name} lives in", tuple(_CITIES)),
    ("{name} works as a", tuple(_JOBS)),
    ("The favourite colour of {name} is", tuple(_COLOURS)),
    ("{name} plays the", tuple(_INSTRUMENTS)),
)
_ONSETS = [
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "k",
    "kl",
    "l",
    "m",
    "n",
    "p",
    "pr",
    "r",
    "s",
    "st",
    "t",
    "tr",
    "v",
    "z",
    "th",
    "sh",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "k", "m"]


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def build_facts(n_people: int, seed: int) -> list[tuple[str, str]]:
    """``(prompt, answer)`` pairs: ``n_people`` fictional people × 4 random attributes.

    Names are two made-up words of 2 and 3 syllables, all distinct; each attribute is drawn
    uniformly and independently, so a fact cannot be inferred from the others.
    """
    rng = random.Random(seed)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n_people:
        first = "".join(_syllable(rng) for _ in range(2)).capitalize()
        last = "".join(_syllable(rng) for _ in range(3)).capitalize()
        name = f"{first} {last}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    facts = []
    for name in names:
        for template, values in RELATIONS:
            facts.append((template.format(name=name), " " + rng.choice(values)))
    return facts


def chance_recall() -> float:
    """Recall of guessing an attribute uniformly (the mean over the four relations)."""
    return statistics.fmean(1 / len(v) for _, v in RELATIONS)


class ByteTokenizer:
    """UTF-8 bytes as token ids (3..258) for the tiny random model: no files needed."""

    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]


def encode(tokenizer: Any, text: str) -> list[int]:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return list(tokenizer.encode(text, add_special_tokens=False))


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor  # (n,) flat index into (B·T) of the positions predicting answers
    targets: torch.Tensor  # (n,)
    fact_of: torch.Tensor  # (n,) which row of the batch each answer token belongs to


def collate(items: Sequence[tuple[list[int], list[int]]], pad: int) -> Batch:
    width = max(len(p) + len(a) for p, a in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    pos, tgt, row = [], [], []
    for i, (p, a) in enumerate(items):
        seq = p + a
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        for j, tok in enumerate(a):
            pos.append(i * width + len(p) + j - 1)  # the logit at t predicts token t+1
            tgt.append(tok)
            row.append(i)
    return Batch(ids, mask, torch.tensor(pos), torch.tensor(tgt), torch.tensor(row))


def data_order(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """The fact indices of every step: a fresh seeded permutation per epoch, epochs chained."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    flat: list[int] = []
    while len(flat) < steps * batch_size:
        flat.extend(torch.randperm(n, generator=gen).tolist())
    return [flat[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def probe_tokens(tokenizer: Any, d: Design) -> tuple[torch.Tensor, dict[str, Any]]:
    """The forgetting probe: the first ``probe_tokens`` tokens of a few stdlib files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for name in d.probe_files:
        ids = encode(tokenizer, (stdlib / name).read_text(encoding="utf-8"))[: d.probe_tokens]
        if len(ids) < d.probe_tokens:
            raise ValueError(f"{stdlib / name} has fewer than {d.probe_tokens} tokens")
        rows.append(ids)
    ids = torch.tensor(rows)
    info = {
        "stdlib": str(stdlib),
        "python": platform.python_version(),
        "files": list(d.probe_files),
        "tokens": int(ids.numel()),
        "sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16],
    }
    return ids, info


# -------------------------------------------------------------------------------------- model
