"""Shared code of the chainopt benchmarks, one concept per module.

Every script builds ONE base model per (architecture, size) from a config and a seed, deep-copies
it into each variant (full fine-tuning, PEFT LoRA, chainopt without a knot, chainopt with a knot
every K steps), and runs the variants step by step in rotation (A B C, B C A, C A B, …) inside one
process, so that whatever else the machine is doing hits all of them alike. Medians are taken
over the timed steps; ratios are against PEFT LoRA with the same targets.

- :mod:`.environment`: the process-wide setup a script does first in ``main()``, its common
  flags, and the machine it ran on.
- :mod:`.models`: the base models built from config, and their batches.
- :mod:`.variants`: one way of training a copy of the base model, and its builders.
- :mod:`.rotation`: warming the variants up and stepping them in rotation.
- :mod:`.timing`: device sync and the statistics of step times.
- :mod:`.memory`: resident tensors and the transient peak of one step.
- :mod:`.dynamo`: ``torch.compile`` counters and limits.
- :mod:`.output`: Markdown tables and JSON.

Scripts put ``bench/`` on ``sys.path`` and import the modules they need; importing the package
imports nothing and changes nothing.
"""

__all__: list[str] = []
