"""Integrations with training frameworks; each submodule imports its own framework.

- :mod:`chainopt.integrations.transformers`: the Hugging Face ``Trainer``
  (:class:`~chainopt.integrations.transformers.ChainLoRACallback`, and
  :func:`~chainopt.integrations.transformers.create_chain_optimizer`, which builds the optimizer
  ``Trainer`` would build from ``TrainingArguments`` and wraps it in a chain).
- :mod:`chainopt.integrations.lightning`: ``ChainLoRACheckpoint``, the Lightning callback that
  lets a chain built in ``configure_optimizers()`` resume bitwise.
- :mod:`chainopt.integrations.deepspeed`: DeepSpeed engines (see its docstring for what runs).

Accelerate (``accelerator.prepare(model, opt, loader)``, its ``accumulate`` context),
``torch.amp`` (autocast, ``GradScaler``: a step the scaler skips is not counted and ties no knot)
and gradient checkpointing need no integration code: a ``ChainLoRAOptimizer`` is a
``torch.optim.Optimizer``, and knots count the wrapped optimizer's real steps. Nor does
``save_pretrained``: a chained Hugging Face model's writes the merged model from construction on
(:mod:`chainopt._hf_save`, torch only, part of the core).
"""

__all__: list[str] = []
