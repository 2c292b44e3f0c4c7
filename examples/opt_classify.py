"""The same COLA-vs-LoRA loop on OPT, the architecture of the COLA paper's main results.

No pretrained OPT ships in any package, so offline this builds a small OPT from ``OPTConfig``
(random weights, the SmolLM2 tokenizer's vocabulary) and the run shows the mechanics: knots on
schedule, the loss across knots, export. Online, ``--model facebook/opt-125m`` (or opt-1.3b on a
GPU) fine-tunes the real model.

Run::

    python examples/opt_classify.py --quick
    python examples/opt_classify.py --model facebook/opt-125m --task strategyqa   # online
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import load_model
from _train import add_arguments, compare


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser, default_model="tiny-opt")
    parser.set_defaults(lr=2e-3)
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model)
    compare(args, model, tokenizer, label=args.model)


if __name__ == "__main__":
    main()
