"""A trained model loaded to answer or score prompts, for `eval`, `compare`, `chat`, `vibe` and `generate`: the
model and tokenizer, with the adapter attached and the chat template the adapter was trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpokit.distributed import process_state
from dpokit.errors import UserError
from dpokit.runs import adapter_base_model

if TYPE_CHECKING:
    from dpokit.config import DPOConfig
    from dpokit.quantization import Quantization


def load_for_inference(
    model_name: str | None,
    adapter: str | None,
    quantization: Quantization | None = None,
    *,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode on this process's device, with the adapter attached when given, the base
    quantized as it loads with `quantization`.

    The tokenizer comes from the adapter folder when training saved one there (it holds the chat template the
    adapter was trained with), else from the base model; `chat_template` (the run's setting, or the flag's)
    replaces its template.
    """
    from dpokit.models import load_adapter, load_model

    model_name = _model_of(model_name, adapter)
    tokenizer = inference_tokenizer(model_name, adapter, chat_template, trust_remote_code)
    device = process_state().device
    model = load_model(model_name, quantization=quantization, device=device, trust_remote_code=trust_remote_code)
    if adapter is not None:
        model = load_adapter(model, adapter)
    model.to(device)
    model.eval()
    return model, tokenizer


def load_with_settings(cfg: DPOConfig, adapter: str | None) -> tuple[Any, Any, Quantization | None]:
    """`load_for_inference` as a command's settings say (`dpokit.settings`): their model, chat template and
    quantization (checked by the probe first); also returns the quantization, for a second model."""
    from dpokit import quantization

    quant = quantization.start(cfg, process_state().device)
    model, tokenizer = load_for_inference(
        cfg.model_name_or_path,
        adapter,
        quant,
        chat_template=cfg.chat_template,
        trust_remote_code=cfg.trust_remote_code,
    )
    return model, tokenizer, quant


def tokenizer_with_settings(cfg: DPOConfig, adapter: str | None) -> Any:
    """The tokenizer `load_with_settings` gives, without the model: to check prompts before weights load."""
    return inference_tokenizer(cfg.model_name_or_path, adapter, cfg.chat_template, cfg.trust_remote_code)


def inference_tokenizer(
    model_name: str | None, adapter: str | None, chat_template: str | None = None, trust_remote_code: bool = False
) -> Any:
    """The tokenizer `load_for_inference` gives, without the model: to check prompts before weights load."""
    from dpokit.models import load_tokenizer

    if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file():
        return load_tokenizer(str(adapter), chat_template=chat_template, trust_remote_code=trust_remote_code)
    return load_tokenizer(_model_of(model_name, adapter), chat_template, trust_remote_code)


def check_loadable(model_name: str | None, adapter: str | None) -> None:
    """What `load_for_inference` would find wrong with the model and the adapter, found in a second without
    reading weights; for commands that load one model after another's work, such as `compare`."""
    from dpokit.models import check_adapter_fits, load_empty_model

    model_name = _model_of(model_name, adapter)
    if adapter is None:
        load_empty_model(model_name)
    else:
        check_adapter_fits(model_name, adapter)


def _model_of(model_name: str | None, adapter: str | None) -> str:
    """The model to load: the one named, else the adapter's own base."""
    if adapter is not None and not Path(adapter).is_dir():
        raise UserError(f"adapter folder {adapter} does not exist")
    if model_name is not None:
        return model_name
    if adapter is None:
        raise UserError("give --model, or an --adapter whose base model is then used")
    return adapter_base_model(adapter)
