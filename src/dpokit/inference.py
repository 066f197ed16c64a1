"""A trained model loaded to answer or score prompts, for `eval`, `compare`, `chat`, `vibe` and `generate`: the
model and tokenizer, with the adapter attached and the chat template the adapter was trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpokit.distributed import process_state
from dpokit.errors import UserError
from dpokit.generation import sampling_from_args as sampling_from_args  # re-exported: compare reads it here
from dpokit.runs import RUN_CONFIG, adapter_base_model, run_folder_of

if TYPE_CHECKING:
    from dpokit.quantization import Quantization


def load_for_inference(
    model_name: str | None, adapter: str | None, quantization: Quantization | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode on this process's device, with the adapter attached when given, the base
    quantized as it loads with `quantization` (`--load-in-4bit` / `--load-in-8bit`).

    The tokenizer comes from the adapter folder when training saved one there (it holds the chat template the
    adapter was trained with), else from the base model with the chat template of the adapter's run, if any.
    """
    from dpokit.models import load_adapter, load_model

    model_name = _model_of(model_name, adapter)
    tokenizer = inference_tokenizer(model_name, adapter)
    device = process_state().device
    model = load_model(model_name, quantization=quantization, device=device)
    if adapter is not None:
        model = load_adapter(model, adapter)
    model.to(device)
    model.eval()
    return model, tokenizer


def inference_tokenizer(model_name: str | None, adapter: str | None) -> Any:
    """The tokenizer `load_for_inference` gives, without the model: to check prompts before weights load."""
    from dpokit.models import load_tokenizer

    if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file():
        return load_tokenizer(str(adapter))
    return load_tokenizer(_model_of(model_name, adapter), chat_template=_run_chat_template(adapter))


def system_message_of(adapter: str | None, given: str | None) -> str:
    """How answers treat system turns: as `--system-message` says, else as the adapter's run was trained."""
    from dpokit.config import load_config

    if given is not None:
        return given
    run_dir = run_folder_of(adapter)
    return load_config(run_dir / RUN_CONFIG).system_message if run_dir is not None else "keep"


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


def _run_chat_template(adapter: str | None) -> str | None:
    """The `chat_template` override of the run the adapter was trained in, so answers use the training format."""
    from dpokit.config import load_config

    run_dir = run_folder_of(adapter)
    return load_config(run_dir / RUN_CONFIG).chat_template if run_dir is not None else None
