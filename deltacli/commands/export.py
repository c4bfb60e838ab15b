"""`deltacli export DELTA_OR_MODEL --to gguf`: what llama.cpp and Ollama load.

A LoRA delta becomes a llama.cpp LoRA adapter (`adapter.gguf`, used over the base GGUF); a
whole Llama-family model (a merged one, say) becomes `model.gguf`. Beside either, an Ollama
`Modelfile`. The format details live in `storage.llama_cpp`; here: which inputs can be
exported, and the Modelfile. Only LoRA has an adapter form in llama.cpp; other linear kinds
merge into the base first.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from deltacli.deltas.lora import LoraConfig
from deltacli.errors import DeltacliError
from deltacli.files.outputs import atomic_dir, notice_on
from deltacli.files.tensors import load_tensors
from deltacli.models.loading import load_config, load_tokenizer, resolve
from deltacli.storage.delta_folder import PEFT_CONFIG_FILE, WEIGHTS_FILE, is_delta_dir, read_delta
from deltacli.storage.llama_cpp import adapter_tensors, check_llama, write_adapter, write_model
from deltacli.tasks.generation import chat_text

ADAPTER_FILE = "adapter.gguf"
MODEL_FILE = "model.gguf"
MODELFILE = "Modelfile"


@dataclasses.dataclass
class ExportReport:
    output: str
    gguf: str  # the file written: the adapter, or the whole model
    modelfile: str
    tensors: int
    alpha: float | None  # an adapter's
    base_gguf: str | None  # the Modelfile's FROM, when the base is a GGUF file
    notes: list[str]


def export(
    source: Path,
    output: Path,
    base_gguf: Path | None = None,
    dtype: str = "f32",
    overwrite: bool = False,
    tokenizer_pre: str | None = None,
    console: Console | None = None,
) -> ExportReport:
    """Export a LoRA delta folder as an adapter, or a model folder as a whole model."""
    if source.is_dir() and is_delta_dir(source):
        return export_adapter(source, output, base_gguf, dtype, overwrite, console)
    if not (source / "config.json").is_file():
        raise DeltacliError(f"{source} is neither a delta folder nor a model folder")
    return export_model(source, output, dtype, tokenizer_pre, overwrite, console)


def export_model(
    folder: Path,
    output: Path,
    dtype: str = "f32",
    tokenizer_pre: str | None = None,
    overwrite: bool = False,
    console: Console | None = None,
) -> ExportReport:
    """`output/model.gguf` (and a Modelfile) from a Llama-family model folder, e.g. the
    output of `deltacli merge`."""
    config = load_config(str(folder))
    check_llama(config)
    tokenizer = load_tokenizer(str(folder))
    with (
        atomic_dir(output, overwrite, "GGUF export", notice_on(console)) as scratch,
        Progress(console=console, disable=console is None, transient=True) as bar,
    ):

        def track(items):
            return bar.track(list(items), description="export")

        count = write_model(
            scratch / MODEL_FILE, folder, config, tokenizer, dtype, tokenizer_pre, track
        )
        (scratch / MODELFILE).write_text(modelfile_text(f"./{MODEL_FILE}", None, tokenizer))
    return ExportReport(str(output), str(output / MODEL_FILE), str(output / MODELFILE), count,
                        None, None, [])  # fmt: skip


def export_adapter(
    delta: Path,
    output: Path,
    base_gguf: Path | None = None,
    dtype: str = "f32",
    overwrite: bool = False,
    console: Console | None = None,
) -> ExportReport:
    """`output/adapter.gguf` and `output/Modelfile` for the LoRA delta in `delta`."""
    saved = read_delta(delta)
    kinds = sorted({config.kind for config in saved.recipe.deltas})
    lora = [config for config in saved.recipe.deltas if isinstance(config, LoraConfig)]
    if kinds != [LoraConfig.kind]:
        raise DeltacliError(
            f"GGUF export takes LoRA deltas; {delta} is {', '.join(kinds)}: llama.cpp has no "
            "adapter of that kind (a linear kind merges into the base: deltacli merge, then "
            "deltacli export MERGED --to gguf)"
        )
    if any(config.use_dora for config in lora):
        raise DeltacliError(
            "llama.cpp has no DoRA adapters: merge the delta into the base (deltacli merge) "
            "and export the merged model (deltacli export MERGED --to gguf)"
        )
    config = load_config(saved.recipe.model)
    check_llama(config)
    peft = json.loads((delta / PEFT_CONFIG_FILE).read_text(encoding="utf-8"))
    if peft.get("modules_to_save"):
        raise DeltacliError(
            f"the delta also trains whole modules ({', '.join(peft['modules_to_save'])}), "
            "which a llama.cpp LoRA adapter cannot hold; merge it instead"
        )
    base = base_gguf or _base_gguf(saved.recipe.model)
    tensors = adapter_tensors(load_tensors(delta / WEIGHTS_FILE), peft, config)
    alpha = float(peft["lora_alpha"])
    with atomic_dir(output, overwrite, "GGUF export", notice_on(console)) as scratch:
        write_adapter(scratch / ADAPTER_FILE, tensors, alpha, dtype, LoraConfig.kind)
        modelfile = modelfile_text(base, ADAPTER_FILE, load_tokenizer(saved.recipe.model))
        (scratch / MODELFILE).write_text(modelfile, encoding="utf-8")
    notes = []
    if base is None:
        notes.append(
            "the base is not a GGUF file: export it too (deltacli export BASE --to gguf) and "
            f"put its path after FROM in {output / MODELFILE}, or pass --base-gguf"
        )
    return ExportReport(str(output), str(output / ADAPTER_FILE), str(output / MODELFILE),
                        len(tensors), alpha, str(base) if base else None, notes)  # fmt: skip


def _base_gguf(model: str) -> Path | None:
    """The base model's GGUF file, where the delta was trained on one (e.g. `smollm2`)."""
    try:
        path = Path(resolve(model))
    except DeltacliError:
        return None
    return path.absolute() if path.suffix == ".gguf" and path.is_file() else None


def modelfile_text(base: Path | str | None, adapter: str | None, tokenizer) -> str:
    """An Ollama Modelfile: the model, the adapter over it, and — for ChatML templates, which
    Ollama would otherwise have to guess — the template, its default system prompt and stop
    token."""
    lines = [
        "# Written by `deltacli export --to gguf`. Run: ollama create NAME -f Modelfile",
        f"FROM {base or './base.gguf  # the base model as GGUF: convert it first'}",
    ]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    template = tokenizer.chat_template or ""
    if "<|im_start|>" not in template:
        lines.append("# TEMPLATE: Ollama reads the chat template from the base GGUF")
        return "\n".join(lines) + "\n"
    lines += [
        'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}',
        "{{ .Content }}<|im_end|>",
        "{{ end }}<|im_start|>assistant",
        '"""',
    ]
    system = _default_system(tokenizer)
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines.append('PARAMETER stop "<|im_end|>"')
    return "\n".join(lines) + "\n"


def _default_system(tokenizer) -> str | None:
    """The system prompt a ChatML template adds when a conversation has none."""
    text = chat_text(tokenizer, [{"role": "user", "content": "x"}])
    start = "<|im_start|>system\n"
    if not text.startswith(start):
        return None
    return text[len(start) : text.index("<|im_end|>")]
