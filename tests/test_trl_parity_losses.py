"""Every TRL 1.16 DPO loss, combination and loss option against TRL's DPOTrainer at step 0, in fp32.

One trainer serves every case: the loss settings its `__init__` copies from `DPOConfig` are set on it per case
(`test_one_trainer_per_case_agrees` checks that against a trainer built from the config). dpokit's side runs its
real path: `SequenceLogps` on the packed, prefix-shared layout, `train.loss_and_metrics` on a `DPOConfig`, and the
means that the training loop's `MetricWindow` logs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

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
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)

SINGLE = [
    {"loss_type": [name]}
    for name in (
        "sigmoid", "hinge", "ipo", "bco_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down", "sigmoid_norm",
        "discopop", "aot", "aot_unpaired", "sft",
    )
] + [
    {"loss_type": ["robust"], "label_smoothing": 0.2},
    {"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
    {"loss_type": ["aot"], "label_smoothing": 0.1},
    {"loss_type": ["discopop"], "discopop_tau": 0.5},
]  # fmt: skip
COMBINED = [
    {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},  # RPO
    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},  # MPO
    {"loss_type": ["ipo", "nca_pair"]},
    {"loss_type": ["sigmoid"], "ld_alpha": 0.5},
    {"loss_type": ["sigmoid", "sft"], "ld_alpha": 0.3},  # the sft term sees the unweighted log-probs
    {"loss_type": ["ipo"], "ld_alpha": 0.0},
    {"loss_type": ["sigmoid"], "use_weighting": True},
    # TRL 1.16 cannot weight its sft term (an in-place multiply of an expanded tensor); test_losses.py covers ours
    {"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [0.8, 0.2], "use_weighting": True},
    {"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"},
    {"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"},
    {"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    {"loss_type": ["ipo", "hinge", "sft"], "f_divergence_type": "alpha_divergence"},
    {"loss_type": ["exo_pair", "discopop"], "label_smoothing": 1e-3, "f_divergence_type": "js_divergence"},
    {"loss_type": ["sigmoid_norm", "robust"], "label_smoothing": 0.1, "f_divergence_type": "forward_kl"},
    {"loss_type": ["sigmoid", "ipo"], "ld_alpha": 0.5, "use_weighting": True, "f_divergence_type": "js_divergence"},
]

TRL_DEFAULTS = {
    "loss_weights": None,
    "label_smoothing": 0.0,
    "ld_alpha": None,
    "use_weighting": False,
    "f_divergence_type": "reverse_kl",
    "f_alpha_divergence_coef": 0.5,
    "discopop_tau": 0.05,
}


def _name(case: dict[str, Any]) -> str:
    return "-".join(f"{v}" if k == "loss_type" else f"{k}={v}" for k, v in case.items()).replace(" ", "")


def trl_trainer(model_dir: Path, ref_dir: Path, rows: list[dict], tmp_path: Path, **settings: Any) -> Any:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=BATCH,
        beta=0.1,
        max_length=1024,
        bf16=False,
        use_cpu=True,
        report_to=[],
        gradient_checkpointing=False,
        disable_dropout=True,
        **{**TRL_DEFAULTS, "loss_type": ["sigmoid"], **settings},
    )
    trainer = trl.DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        ref_model=AutoModelForCausalLM.from_pretrained(ref_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=load_tokenizer(str(model_dir)),
    )
    trainer.model.train()
    return trainer


def trl_step0(trainer: Any, settings: dict[str, Any] | None = None) -> tuple[float, dict[str, float]]:
    """TRL's loss and logged metrics on the first batch; `settings` are set on the trainer first."""
    if settings is not None:
        s = {**TRL_DEFAULTS, **settings}
        trainer.loss_types = s["loss_type"]
        trainer.loss_weights = s["loss_weights"] or [1.0] * len(s["loss_type"])
        trainer.args.discopop_tau = s["discopop_tau"]
        for key in ("label_smoothing", "ld_alpha", "use_weighting", "f_divergence_type", "f_alpha_divergence_coef"):
            setattr(trainer, key, s[key])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
    with torch.no_grad():
        loss = float(trainer._compute_loss(trainer.model, batch, return_outputs=False))
    return loss, {k: trainer._metrics["train"][k][-1] for k in METRICS}


def ours_step0(models: dict[str, Any], settings: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """dpokit's per-pair losses and metric values on the same pairs, through the training path."""
    cfg = load_config(None, {**settings})
    policy = SequenceLogps(models["policy"], ld_alpha=cfg.ld_alpha, wpo=cfg.use_weighting)
    reference = SequenceLogps(models["reference"], ld_alpha=cfg.ld_alpha)
    with torch.no_grad():
        pol, ref = policy(models["layout"]), reference(models["layout"])
        return loss_and_metrics(cfg, pol, (ref.chosen, ref.rejected))


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, tiny_ref_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    rows = conversational_rows(BATCH)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    pairs = encode_pairs(tokenizer, [as_text_pair(r["prompt"], r["chosen"], r["rejected"]) for r in rows])
    return {
        # built with WPO on, so TRL's LM head also returns what WPO's weights need
        "trainer": trl_trainer(
            tiny_model_dir, tiny_ref_model_dir, rows, tmp_path_factory.mktemp("trl"), use_weighting=True
        ),
        "policy": load_model(str(tiny_model_dir)).eval(),
        "reference": load_model(str(tiny_ref_model_dir)).eval(),
        "layout": collate(pairs, tokenizer.pad_token_id, padding_free=True, prefix_sharing=True),
    }


def logged(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """What dpokit logs of these per-pair values: the means of the training loop's `MetricWindow`."""
    from accelerate import Accelerator

    window = new_window()
    window.add(values, torch.ones(BATCH))
    window.steps += 1
    return window.means(Accelerator(cpu=True))


def assert_matches(ours: tuple[torch.Tensor, dict[str, torch.Tensor]], theirs: tuple[float, dict[str, float]]) -> None:
    losses, values = ours
    trl_loss, trl_metrics = theirs
    row = logged(values)
    assert float(values["rewards/chosen"].abs().mean()) > 0.1  # not at the trivial point policy == reference
    assert set(row) == {"loss", *METRICS}  # TRL's names, and no others
    assert math.isclose(row["loss"], trl_loss, rel_tol=1e-4, abs_tol=1e-6)
    for key in METRICS:
        # means of values of either sign can nearly cancel; their tolerance is relative to the size of the values
        scale = 1.0 if key == "rewards/accuracies" else float(values[key].abs().mean())
        assert abs(row[key] - trl_metrics[key]) <= 1e-4 * scale, key


@pytest.mark.parametrize("case", SINGLE + COMBINED, ids=_name)
def test_step0_loss_and_metrics_match_trl(setup: dict, case: dict[str, Any]) -> None:
    assert_matches(ours_step0(setup, case), trl_step0(setup["trainer"], case))


def test_rpo_alpha_runs_as_trls_list_form(setup: dict) -> None:
    ours = ours_step0(setup, {"loss_type": ["ipo"], "rpo_alpha": 0.7})
    assert_matches(ours, trl_step0(setup["trainer"], {"loss_type": ["ipo", "sft"], "loss_weights": [1.0, 0.7]}))


def test_one_trainer_per_case_agrees(
    setup: dict, tiny_model_dir: Path, tiny_ref_model_dir: Path, tmp_path: Path
) -> None:
    """A trainer built from the config gives what the shared trainer gives with the settings set on it."""
    case = {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0], "ld_alpha": 0.5}
    built = trl_trainer(tiny_model_dir, tiny_ref_model_dir, conversational_rows(BATCH), tmp_path, **case)
    fresh, shared = trl_step0(built), trl_step0(setup["trainer"], case)
    assert fresh[0] == pytest.approx(shared[0], rel=1e-6)
    assert fresh[1] == pytest.approx(shared[1], rel=1e-6)


def test_orpo_matches_trls_experimental_orpo(tiny_model_dir: Path, tmp_path: Path) -> None:
    """ORPO against TRL's `ORPOTrainer` on its own tokenization, in fp32: the odds-ratio term, its logged mean and
    rewards. TRL's NLL term counts the prompt's tokens too, where ORPO's paper and dpokit count the response's
    only, so the whole losses differ by that term and are compared without it."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from dpokit.data.encode import EncodedPair

    args = ORPOConfig(
        output_dir=str(tmp_path / "orpo"),
        per_device_train_batch_size=BATCH,
        beta=0.2,
        max_length=1024,
        bf16=False,
        use_cpu=True,
        report_to=[],
        disable_dropout=True,
    )
    rows = conversational_rows(BATCH)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    trainer = ORPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    examples = [trainer.train_dataset[i] for i in range(BATCH)]
    trainer.model.train()
    with torch.no_grad():
        trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(examples))

    def split(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        start = next(i for i, label in enumerate(labels) if label != -100)
        return ids[:start], ids[start:]

    pairs = []
    for ex in examples:
        prompt, chosen = split(ex["chosen_input_ids"], ex["chosen_labels"])
        assert split(ex["rejected_input_ids"], ex["rejected_labels"])[0] == prompt
        pairs.append(EncodedPair(prompt, chosen, split(ex["rejected_input_ids"], ex["rejected_labels"])[1]))
    cfg = load_config(None, {"loss_type": "orpo", "orpo_alpha": 0.2})
    policy = SequenceLogps(load_model(str(tiny_model_dir)).eval())
    with torch.no_grad():
        pol = policy(collate(pairs, tokenizer.pad_token_id, padding_free=True, prefix_sharing=True))
        losses, values = loss_and_metrics(cfg, pol, (pol.chosen * 0, pol.rejected * 0))
    nll = -pol.chosen.sum() / pol.chosen_lengths.sum()
    odds_term = float(losses.mean() - nll)
    assert math.isclose(odds_term, float(trl_loss) - trl_metrics["nll_loss"], rel_tol=1e-4)
    assert math.isclose(odds_term, -0.2 * trl_metrics["log_odds_ratio"], rel_tol=1e-4)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(float(values[key].mean()) - trl_metrics[key]) <= 1e-4 * float(values[key].abs().mean()), key
    assert float(values["rewards/accuracies"].mean()) == trl_metrics["rewards/accuracies"]
    average = {"logps/chosen": pol.chosen / pol.chosen_lengths, "logps/rejected": pol.rejected / pol.rejected_lengths}
    for key, ours in average.items():  # TRL's ORPO logs per-token averages, dpokit sums (as TRL's DPO does)
        assert math.isclose(float(ours.mean()), trl_metrics[key], rel_tol=1e-4), key
