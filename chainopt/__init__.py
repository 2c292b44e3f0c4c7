"""chainopt: Chain of LoRA (COLA) for any PyTorch training loop.

Wrap your optimizer; ``step()`` trains rank-r LoRA links and ties them into the frozen weights on
a schedule, so the chain reaches a higher-rank update than one LoRA at the same cost.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import chainopt
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> opt = chainopt.ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters()),
    ...                                   target_modules=["0"], rank=4, knot_every=100)
    >>> opt.knots_tied
    0
"""

from ._hf_save import (
    ParametrizedCheckpointWarning,
    guard_save_pretrained,
    save_merged,
    saving_for_resume,
    saving_merged,
)
from .advice import ChainLoRAWarning
from .averaging import track_average
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ChainConfig, NonFinitePolicy
from .export import adapted_modules, merge_and_unload, merged_state_dict
from .guard import NonFiniteUpdateError
from .history import ChainHistory, KnotRecord, LinkFactors
from .init import InitPolicy, a_from_gradient
from .lora import BiasDelta, LoRAParametrization
from .optimizer import ChainLoRAOptimizer, KnotHook, OptimizerSpec
from .peft_export import AdapterReport, export_peft_adapter, peft_adapter_state_dict
from .reset import ResetPolicy
from .schedule import KnotSchedule
from .summary import ChainSummary, ModuleSummary
from .targets import ModuleSpec
from .warmup import KnotWarmup

__all__ = [
    "AdapterReport",
    "BiasDelta",
    "ChainConfig",
    "ChainHistory",
    "ChainLoRAOptimizer",
    "ChainLoRAWarning",
    "ChainSummary",
    "InitPolicy",
    "KnotHook",
    "KnotRecord",
    "KnotSchedule",
    "KnotWarmup",
    "LinkFactors",
    "LoRAParametrization",
    "ModuleSpec",
    "ModuleSummary",
    "NonFinitePolicy",
    "NonFiniteUpdateError",
    "OptimizerSpec",
    "ParametrizedCheckpointWarning",
    "ResetPolicy",
    "a_from_gradient",
    "adapted_modules",
    "export_peft_adapter",
    "guard_save_pretrained",
    "load_checkpoint",
    "merge_and_unload",
    "merged_state_dict",
    "peft_adapter_state_dict",
    "save_checkpoint",
    "save_merged",
    "saving_for_resume",
    "saving_merged",
    "track_average",
]

__version__ = "0.1.0"
