"""A real client loads the export: llama.cpp (through llama-cpp-python) runs the SmolLM2 GGUF
the demo trains on with the adapter `deltacli export --to gguf` wrote, and its greedy answers
to SST-2 chat prompts are compared with deltacli's own (base + delta, the path `eval
--generate` takes). The base without the adapter is the control: its answers differ.

Both sides are given the same token ids (the tokenizer's, as deltacli tokenises the prompt);
whether llama.cpp's own tokenisation of the prompt text gives the same ids is reported too.
llama.cpp computes with the file's Q4_1 weights (in the layout the file stores them; see
`load_llama`) (activations quantised to 8 bits in its
matrix products), deltacli with the same weights dequantised to float32: equal answers are
the claim, not equal logits. Writes benchmarks/results/llama-cpp-check-DATE.json.

    deltacli train --method lora_instruct -o runs/lora_instruct
    pip install llama-cpp-python
    python benchmarks/llama_cpp_check.py runs/lora_instruct --prompts 20
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rich.console import Console
from rich.table import Table

from measure import write_results


def load_llama(model: Path, **options):
    """llama.cpp's model without its repacked weight layouts ("extra buffer types"): with
    them, llama-cpp-python 0.3.36 crashes computing SmolLM2's Q4_1 weights on a CPU with
    AMX (observed on this project's Sapphire Rapids machine, 2026-12-01); without them the
    weights are used as the file stores them."""
    import llama_cpp
    import llama_cpp.llama

    defaults = llama_cpp.llama_model_default_params

    def plain_layouts():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama.llama_cpp.llama_model_default_params = plain_layouts
    try:
        return llama_cpp.Llama(str(model), verbose=False, **options)
    finally:
        llama_cpp.llama.llama_cpp.llama_model_default_params = defaults


def llama_cpp_answers(model: Path, adapter: Path | None, prompts: list[list[int]],
                      new_tokens: int) -> list[str]:  # fmt: skip
    options = {"lora_path": str(adapter)} if adapter else {}
    llm = load_llama(model, n_ctx=512, n_threads=os.cpu_count(), type_k=0, type_v=0, **options)
    try:
        return [
            llm.create_completion(ids, max_tokens=new_tokens, temperature=0.0)["choices"][0]["text"]
            for ids in prompts
        ]
    finally:
        llm.close()


def same_tokens(model: Path, prompts: list[str], ids: list[list[int]]) -> int:
    """How many prompts llama.cpp's own tokenizer splits into the ids transformers gives."""
    llm = load_llama(model, vocab_only=True)
    try:
        return sum(
            llm.tokenize(p.encode(), add_bos=False, special=True) == i
            for p, i in zip(prompts, ids, strict=True)
        )
    finally:
        llm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("delta", type=Path, help="a LoRA delta of SmolLM2 (lora_instruct)")
    parser.add_argument("--prompts", type=int, default=20, help="SST-2 chat prompts to answer")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens per answer")
    args = parser.parse_args()

    from deltacli.commands.chat import open_chat_model
    from deltacli.commands.export import export
    from deltacli.models.loading import load_model
    from deltacli.recipe import load_recipe, recipe_file
    from deltacli.storage.delta_folder import read_delta
    from deltacli.tasks.evaluation import generate
    from deltacli.tasks.registry import CAUSAL_LM
    from deltacli.tasks.tables import load_sources

    saved = read_delta(args.delta)
    recipe = load_recipe(recipe_file("lora_instruct", None), [])
    table = load_sources("sst2_chat:validation", None, 0).select(range(args.prompts))
    model, tokenizer = open_chat_model(str(args.delta))
    pairs = CAUSAL_LM.prompts(table, recipe.data, tokenizer)
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    answers = {"deltacli, base + delta": generate(model, tokenizer, prompts, args.new_tokens)}
    base = load_model(saved.recipe.model, CAUSAL_LM.name, None).eval()
    answers["deltacli, base"] = generate(base, tokenizer, prompts, args.new_tokens)
    with tempfile.TemporaryDirectory() as scratch:
        report = export(args.delta, Path(scratch) / "gguf")
        base_gguf = Path(report.base_gguf)
        adapter = Path(report.gguf)
        answers["llama.cpp, base GGUF + adapter"] = llama_cpp_answers(
            base_gguf, adapter, ids, args.new_tokens
        )
        answers["llama.cpp, base GGUF"] = llama_cpp_answers(base_gguf, None, ids, args.new_tokens)
        tokenised_alike = same_tokens(base_gguf, prompts, ids)

    ours = [a.strip() for a in answers["deltacli, base + delta"]]
    rows = []
    for name, texts in answers.items():
        texts = [t.strip() for t in texts]
        rows.append({
            "model": name,
            "agree_with_deltacli_delta": sum(a == b for a, b in zip(texts, ours, strict=True)),
            "exact_match": sum(a == r.strip() for a, r in zip(texts, references, strict=True)),
            "answers": texts,
        })  # fmt: skip
    path = write_results(
        "llama-cpp-check",
        "greedy answers of llama.cpp (base GGUF + exported adapter) vs deltacli (base + delta)",
        rows,
        delta=str(args.delta),
        prompts=args.prompts,
        new_tokens=args.new_tokens,
        tokenised_alike=tokenised_alike,
        base_gguf=base_gguf.name,
    )
    table_out = Table(
        title=f"{args.prompts} SST-2 chat prompts, greedy, {args.new_tokens} new tokens"
    )
    for column in ("model", "same answer as deltacli + delta", "exact match with the label"):
        table_out.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        table_out.add_row(row["model"], f"{row['agree_with_deltacli_delta']}/{args.prompts}",
                          f"{row['exact_match']}/{args.prompts}")  # fmt: skip
    console = Console()
    console.print(table_out)
    console.print(
        f"llama.cpp tokenises {tokenised_alike}/{args.prompts} prompts as transformers does"
    )
    console.print(f"raw results: {path}")


if __name__ == "__main__":
    main()
