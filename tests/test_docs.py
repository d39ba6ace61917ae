"""The README's usage snippets run as written: FSDP2, distributed checkpoints and DDP in a
2-process job, Hugging Face Trainer and Lightning where those libraries are installed."""

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fused_optim

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(name: str) -> str:
    found = re.search(rf"<!-- snippet: {name} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert found, f"README has no snippet {name!r}"
    return found.group(1)


def _trained(opt, params, steps: int) -> None:
    """Every param with a grad took ``steps`` fused steps."""
    assert isinstance(opt, fused_optim.FusedOptimizer)
    stepped = [p for p in params if p in opt.state]
    assert stepped and all(float(opt.state[p]["step"]) == steps for p in stepped)


@pytest.mark.skipif(not dist.is_available(), reason="this torch is built without torch.distributed")
def test_fsdp2_and_checkpoint_snippets(tmp_path):
    import ranks

    if ranks.fully_shard is None:
        pytest.skip("FSDP2 (fully_shard) needs torch >= 2.4")
    ranks.run_ranks(ranks.docs_fsdp2, ranks.WORLD, snippet("fsdp2"), snippet("dcp"), str(tmp_path))


@pytest.mark.skipif(not dist.is_available(), reason="this torch is built without torch.distributed")
def test_ddp_snippet():
    import ranks

    ranks.run_ranks(ranks.docs_ddp, ranks.WORLD, snippet("ddp"))


def test_hugging_face_trainer_snippet(tmp_path):
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate, not installed")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    before = [p.detach().clone() for p in model.parameters()]
    train_dataset = [
        {"input_ids": torch.randint(0, 64, (8,)), "attention_mask": torch.ones(8, dtype=torch.long), "labels": i % 2}
        for i in range(16)
    ]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, use_cpu=True, report_to="none",
        save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    ns = {"model": model, "args": args, "train_dataset": train_dataset}
    exec(snippet("hf-trainer"), ns)
    _trained(ns["opt"], list(model.parameters()), 4)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_lightning_snippet(tmp_path):
    L = pytest.importorskip("lightning", reason="Lightning is not installed")
    ns = {}
    exec(snippet("lightning"), ns)
    torch.manual_seed(0)
    module = ns["Regressor"]()
    data = torch.utils.data.TensorDataset(torch.randn(24, 8), torch.randn(24, 1))
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    opt = trainer.optimizers[0]
    _trained(opt, list(module.parameters()), 3)
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is opt
