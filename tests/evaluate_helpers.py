"""Tiny models, adapters and run folders shared by the evaluate, compare, merge and chat tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tiny import save_tiny

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris.", "I am not sure."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Maybe six, or no legs at all."),
    ("Write a haiku about the sea.", "Waves fold into foam, salt wind combs the grey water.", "No."),
    ("Explain gradient descent in one sentence.", "It walks downhill on the loss, one step at a time.", "Yes!"),
    ("Say hello.", "Hello hello!", "Hello."),
]


def make_adapter(base: Path, target: Path, seed: int = 0, base_name: str | None = None) -> Path:
    """A LoRA adapter on `base` with random (non-zero) B matrices, so it changes the model's outputs.

    With `base_name`, also the `dpokit.json` that `dpokit train` writes beside the adapter.
    """
    from dpokit.models import add_lora, load_model

    model = add_lora(load_model(str(base)), r=4, alpha=8, dropout=0.0, target_modules=["all-linear"], seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.save_pretrained(target)
    if base_name is not None:
        (target / "dpokit.json").write_text(json.dumps({"base_model": base_name}))
    return target


def make_run(root: Path, base: Path, beta: float = 0.2) -> Path:
    """A run folder as `dpokit train` leaves it: config.yaml and the adapter in RUN_DIR/adapter."""
    run = root / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"model_name_or_path: {base}\nbeta: {beta}\n")
    make_adapter(base, run / "adapter")
    return run


def write_pairs(path: Path) -> Path:
    rows = [
        {
            "prompt": [{"role": "user", "content": p}],
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
        }
        for p, c, r in PAIRS
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_base(root: Path, seed: int = 0) -> Path:
    return save_tiny(root / f"tiny-{seed}", seed=seed)
