"""dpokit against TRL's DPOTrainer on the same model, data and batch: tokenization, loss and logged metrics.

The reference model is a different tiny model, so rewards and margins are far from zero and every metric is
checked for real, not only at the trivial point where policy equals reference.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from conftest import conversational_rows
from dpokit.config import load_config
from dpokit.data.collate import collate
from dpokit.data.encode import encode_pairs
from dpokit.data.rows import as_text_pair
from dpokit.logprobs import SequenceLogps
from dpokit.models import load_model, load_tokenizer
from dpokit.train import loss_and_metrics, new_window

trl = pytest.importorskip("trl")

BATCH = 4
TRL_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def text_rows(n: int) -> list[dict]:
    rows = conversational_rows(n, seed=3)
    return [
        {
            "prompt": r["prompt"][-1]["content"] + "\n",
            "chosen": r["chosen"][0]["content"],
            "rejected": r["rejected"][0]["content"],
        }
        for r in rows
    ]


def make_trainer(model_dir: Path, ref_dir: Path, rows: list[dict], loss_type: str, tmp_path: Path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=BATCH,
        loss_type=[loss_type],
        beta=0.1,
        label_smoothing=0.2 if loss_type == "robust" else 0.0,
        max_length=1024,
        bf16=False,
        use_cpu=True,
        report_to=[],
        gradient_checkpointing=False,
        disable_dropout=True,
    )
    return trl.DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        ref_model=AutoModelForCausalLM.from_pretrained(ref_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=load_tokenizer(str(model_dir)),
    )


@pytest.mark.parametrize("kind", ["conversational", "standard"])
def test_tokenization_matches_trl(tiny_model_dir: Path, tiny_ref_model_dir: Path, tmp_path: Path, kind: str) -> None:
    rows = conversational_rows(12) if kind == "conversational" else text_rows(12)
    trainer = make_trainer(tiny_model_dir, tiny_ref_model_dir, rows, "sigmoid", tmp_path)
    ours = encode_pairs(
        load_tokenizer(str(tiny_model_dir)), [as_text_pair(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    )
    for i, theirs in enumerate(trainer.train_dataset):
        assert ours[i].prompt_ids == theirs["prompt_ids"]
        assert ours[i].chosen_ids == theirs["chosen_ids"]
        assert ours[i].rejected_ids == theirs["rejected_ids"]


@pytest.mark.parametrize(
    "loss_type", ["sigmoid", "hinge", "ipo", "robust", "bco_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down"]
)
def test_step0_loss_and_metrics_match_trl(
    tiny_model_dir: Path, tiny_ref_model_dir: Path, tmp_path: Path, loss_type: str
) -> None:
    rows = conversational_rows(BATCH)
    trainer = make_trainer(tiny_model_dir, tiny_ref_model_dir, rows, loss_type, tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
    trainer.model.train()
    with torch.no_grad():
        trl_loss = float(trainer._compute_loss(trainer.model, batch, return_outputs=False))
    trl_metrics = {k: trainer._metrics["train"][k][-1] for k in TRL_METRICS}

    tokenizer = load_tokenizer(str(tiny_model_dir))
    pairs = encode_pairs(tokenizer, [as_text_pair(r["prompt"], r["chosen"], r["rejected"]) for r in rows])
    policy = SequenceLogps(load_model(str(tiny_model_dir)))
    reference = SequenceLogps(load_model(str(tiny_ref_model_dir)))
    layout = collate(pairs, tokenizer.pad_token_id, padding_free=True, prefix_sharing=True)
    cfg = load_config(
        None, {"loss_type": loss_type, "beta": 0.1, "label_smoothing": 0.2 if loss_type == "robust" else 0.0}
    )
    with torch.no_grad():
        pol, ref = policy(layout), reference(layout)
        _, values = loss_and_metrics(cfg, pol, (ref.chosen, ref.rejected))
    window = new_window()  # what the training loop logs: the window's pair-weighted means
    window.add(values, torch.ones(BATCH))
    ours = window.means(Accelerator(cpu=True))
    # means of values of either sign can nearly cancel; their tolerance is relative to the size of the values
    scale = {key: 1.0 if key == "rewards/accuracies" else values[key].abs().mean() for key in TRL_METRICS}
    assert float(values["rewards/chosen"].abs().mean()) > 0.1  # the comparison is not at the trivial point
    assert math.isclose(ours["loss"], trl_loss, rel_tol=1e-4, abs_tol=1e-6)
    for key in TRL_METRICS:
        assert abs(float(ours[key]) - trl_metrics[key]) <= 1e-4 * float(scale[key]), key
