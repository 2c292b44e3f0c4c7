"""TRL's SFTTrainer with a chain, unchanged: knots on optimizer steps, a final save that reloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from models import tiny_llama

from chainopt import ChainLoRAOptimizer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

WORDS = [f"w{i}" for i in range(60)]


def _tokenizer() -> Any:
    """A word-level tokenizer over the tiny Llama's 64 ids, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {w: i + 4 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>",
    )  # fmt: skip


def _texts(n: int = 24) -> Any:
    gen = torch.Generator().manual_seed(3)
    rows = [
        " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (12,), generator=gen))
        for _ in range(n)
    ]
    return datasets.Dataset.from_dict({"text": rows})


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_sft_trainer_ties_knots_and_its_final_save_reloads_as_the_fine_tuned_model(
    tmp_path: Path,
) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    model.config.pad_token_id = 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), target_modules="all-linear",
        rank=2, alpha=4, knot_every=2, seed=1,
    )  # fmt: skip
    knots: list[int] = []
    opt.register_knot_hook(lambda o, record: knots.append(record.step))
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "run"), max_steps=5, per_device_train_batch_size=4,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, max_length=16, seed=1,
        bf16=False,  # SFTConfig's default; Accelerate would wrap model.forward in bf16 autocast
    )  # fmt: skip
    trainer = trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=_texts(),
        processing_class=_tokenizer(),
        optimizers=(opt, None),
    )
    trainer.train()

    assert opt.optimizer_steps == 5 and knots == [2, 4]  # on optimizer steps, as scheduled
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    ids = torch.randint(4, 64, (2, 10), generator=torch.Generator().manual_seed(5))
    expected = _logits(model.eval(), ids)
    fresh = tiny_llama()
    assert not torch.allclose(_logits(fresh, ids), expected, atol=1e-3)  # it did train
    assert before.keys() != model.state_dict().keys()  # the links are still attached

    trainer.save_model(str(tmp_path / "final"))  # the script's last line, unchanged
    loaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "final", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(_logits(loaded.eval(), ids), expected, rtol=1e-5, atol=1e-5)


def _sft_config(tmp_path: Path, **kwargs: Any) -> Any:
    options: dict[str, Any] = dict(
        output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=4,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, max_length=16, seed=1, bf16=False,
    )  # fmt: skip
    options.update(kwargs)
    return trl.SFTConfig(**options)


def _chained_peft_llama() -> tuple[torch.nn.Module, ChainLoRAOptimizer]:
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    base.config.pad_token_id = 0
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2, seed=1
    )
    return model, opt


def test_sft_trainer_over_a_chained_peft_model_saves_the_whole_chain_and_resumes(
    tmp_path: Path,
) -> None:
    """The documented TRL path for PEFT users: build the PeftModel, chain it, no peft_config."""
    from peft import PeftModel

    model, opt = _chained_peft_llama()
    args = _sft_config(tmp_path, save_strategy="steps", save_steps=3)
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=_texts(), processing_class=_tokenizer(),
        optimizers=(opt, None),
    )  # fmt: skip
    trainer.train()
    assert opt.optimizer_steps == 6 and opt.knots_tied == 3
    ids = torch.randint(4, 64, (2, 10), generator=torch.Generator().manual_seed(5))
    expected = _logits(model.eval(), ids)
    assert not torch.allclose(_logits(tiny_llama(), ids), expected, atol=1e-3)  # it trained

    trainer.save_model(str(tmp_path / "final"))  # the user's own save: the whole chain
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "final").eval()
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)

    # resume from the checkpoint after step 3 (one knot tied, a link under way): bitwise
    model2, opt2 = _chained_peft_llama()
    from chainopt.integrations.transformers import ChainLoRACallback

    trainer2 = trl.SFTTrainer(
        model=model2, args=args, train_dataset=_texts(), processing_class=_tokenizer(),
        optimizers=(opt2, None), callbacks=[ChainLoRACallback()],
    )  # fmt: skip
    trainer2.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert (opt2.optimizer_steps, opt2.knots_tied) == (6, 3)
    torch.testing.assert_close(_logits(model2.eval(), ids), expected, rtol=0, atol=0)


def test_sft_trainer_with_peft_config_over_a_chain_refuses_to_train_nothing(
    tmp_path: Path,
) -> None:
    """SFTTrainer(peft_config=...) wraps the chained model with get_peft_model, which freezes
    every chain factor: the first step raises, naming peft_config, instead of a silent run."""
    from peft import LoraConfig

    model = tiny_llama()
    model.config.pad_token_id = 0
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), target_modules=["q_proj"],
        knot_every=2,
    )  # fmt: skip
    trainer = trl.SFTTrainer(
        model=model, args=_sft_config(tmp_path), train_dataset=_texts(),
        processing_class=_tokenizer(), optimizers=(opt, None),
        peft_config=LoraConfig(r=2, target_modules=["v_proj"], task_type="CAUSAL_LM"),
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="peft_config"):
        trainer.train()
    assert opt.knots_tied == 0


def test_a_chain_built_on_the_peft_model_sft_trainer_made_from_peft_config(
    tmp_path: Path,
) -> None:
    """SFTTrainer(peft_config=...) builds the PeftModel itself: chain trainer.model and hand the
    chain to the trainer (trainer.optimizer) before train(); its save is the whole chain."""
    from peft import LoraConfig, PeftModel

    base = tiny_llama()
    base.config.pad_token_id = 0
    trainer = trl.SFTTrainer(
        model=base, args=_sft_config(tmp_path), train_dataset=_texts(),
        processing_class=_tokenizer(),
        peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                               task_type="CAUSAL_LM"),
    )  # fmt: skip
    model = trainer.model
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    trainer.optimizer = opt
    trainer.train()
    assert (opt.optimizer_steps, opt.knots_tied) == (6, 3)
    ids = torch.randint(4, 64, (2, 10), generator=torch.Generator().manual_seed(5))
    expected = _logits(model.eval(), ids)
    trainer.save_model(str(tmp_path / "final"))
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "final").eval()
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)
