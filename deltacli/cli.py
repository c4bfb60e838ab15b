"""The `deltacli` command: options in, one library call, a table or JSON out.

Each command only parses options and calls the library; anything it does is also callable
from Python. A `DeltacliError` becomes one red line and exit code 2 (`DELTACLI_DEBUG=1` shows
the traceback).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape

from deltacli.errors import DeltacliError

try:  # typer 0.2x carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_errors

app = typer.Typer(
    name="deltacli",
    help="Delta tuning (parameter-efficient fine-tuning) of Hugging Face transformers.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console()
err = Console(stderr=True)

Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Recipe overrides as dotted key=value, e.g. train.lr=1e-4 deltas.0.r=16 "
        "(every key: deltacli recipes --keys)."
    ),
]
Method = Annotated[
    str | None,
    typer.Option("--method", "-m", help="A shipped recipe by name (see `deltacli recipes`)."),
]
RecipeFile = Annotated[
    Path | None, typer.Option("--recipe", "-r", help="A recipe YAML file.", dir_okay=False)
]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]

TRAIN_EXAMPLES = r"""
[bold]Examples[/]

  [dim]# the embedded MiniLM on the bundled SST-2 sample[/]
  deltacli train --method lora
  deltacli train --method bitfit --output runs/bitfit --overwrite
  deltacli train --method lora --model ./bert --data train.csv --eval-data dev.csv
  deltacli train --recipe my.yaml train.lr=1e-4 deltas.0.r=16 'deltas.0.targets=\[query,value]'
  [dim]# two processes (GPUs, or CPUs with gloo)[/]
  accelerate launch --multi_gpu --num_processes 2 -m deltacli train --method lora

Every key=value a recipe takes, with its type, range, default and help:
  deltacli recipes --keys lora
"""


@app.command(epilog=TRAIN_EXAMPLES)
def train(
    overrides: Overrides = None,
    method: Method = None,
    recipe: RecipeFile = None,
    model: Annotated[
        str | None, typer.Option(help="Base model: a local directory, a Hub id, or `default`.")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Training data: csv/tsv/json/jsonl/parquet file, sst2:train, or Hub NAME[:SPLIT]."
        ),
    ] = None,
    eval_data: Annotated[
        str | None,
        typer.Option(help="Evaluation data, same forms. With --data alone, 10% of it is held out."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help=r"Delta directory to write \[default: runs/NAME-TIME]."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace --output if it is a directory deltacli wrote.")
    ] = False,
    mask: Annotated[
        str | None,
        typer.Option(help="Index masks for sparse deltas, from `sparsify --from-gradients`."),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue the interrupted run that was writing this output, from its newest "
            "checkpoint, with its own recipe (train.* overrides allowed).",
            metavar="OUTPUT",
        ),
    ] = None,
) -> None:
    """Fine-tune a delta (LoRA, BitFit, LayerNorm, ... or full) and save it.

    Shows progress, evaluates after every epoch, keeps the best epoch, and writes a delta
    directory (PEFT's format where PEFT has the method) with the resolved recipe and metrics.
    Checkpoints at every epoch's end (train.save_every=N: every N steps); Ctrl-C or SIGTERM
    saves one and says how to --resume.
    """
    from deltacli.recipe import load_recipe, recipe_file, with_mask
    from deltacli.render import preview_table, train_summary
    from deltacli.training.runs import resume as resume_training
    from deltacli.training.runs import train as run_training

    settings: dict[str, str | None] = {"model": model} if model else {}
    if data:
        settings |= {"data.train": data, "data.eval": eval_data}
    elif eval_data:
        settings["data.eval"] = eval_data
    if resume is not None:
        if settings or method or recipe or mask or output:
            raise DeltacliError(
                "--resume continues a run with its saved recipe and output; drop --method, "
                "--recipe, --model, --data, --eval-data, --mask and --output"
            )
        result = resume_training(resume, overrides or [], console=err)
    else:
        resolved = load_recipe(recipe_file(method, recipe), overrides or [], settings)
        if mask:
            resolved = with_mask(resolved, mask)
        result = run_training(resolved, output, overwrite, console=err)
    if result.metrics and _is_main_process():
        out.print(train_summary(str(result.output), result.metrics))
        if result.metrics.get("preview"):
            out.print(preview_table(result.metrics["preview"]))


EVAL_EXAMPLES = """
[bold]Examples[/]

  deltacli eval --delta runs/lora --data sst2:validation
  deltacli eval --delta runs/lora_instruct --data sst2_chat:validation --generate 20
  deltacli eval --delta runs/lora_dpo --data sst2_pref:validation --generate 20
"""


@app.command("eval", epilog=EVAL_EXAMPLES)
def evaluate(
    delta: Annotated[Path, typer.Option(help="Delta directory (deltacli's or a PEFT adapter).")],
    data: Annotated[
        str, typer.Option(help="Data to score: a file, a bundled sample, or a Hub NAME[:SPLIT].")
    ],
    model: Annotated[
        str | None, typer.Option(help="Base model [default: the one the delta names].")
    ] = None,
    text: Annotated[str | None, typer.Option(help="Text column [default: the recipe's].")] = None,
    text_pair: Annotated[str | None, typer.Option(help="Second text column, for pairs.")] = None,
    label: Annotated[str | None, typer.Option(help="Label column [default: the recipe's].")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per batch.")] = 64,
    generate: Annotated[
        int, typer.Option(min=0, help="Generative tasks: generate for the first N examples.")
    ] = 0,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most.")] = 64,
    sample: Annotated[bool, typer.Option(help="Sample instead of greedy decoding.")] = False,
    generations: Annotated[
        Path, typer.Option(help="JSONL file for the generations and their references.")
    ] = Path("generations.jsonl"),
    task: Annotated[
        str | None,
        typer.Option(
            help="The delta's task, for a PEFT adapter saved without task_type "
            "[default: the delta's, else the base model's config]."
        ),
    ] = None,
    json: Json = False,
) -> None:
    """Score base model + delta on a data set: accuracy, macro-F1 and Matthews correlation,
    or, for generative tasks, loss and perplexity (and with --generate, exact match, ROUGE-L
    and BLEU of generations written beside their references); on preference pairs, reward
    accuracy and margin against the base (the delta switched off)."""
    from deltacli.commands.evaluate import GenerationRequest, score_delta
    from deltacli.render import metrics_table, print_json

    columns = {"text": text, "text_pair": text_pair, "label": label}
    request = GenerationRequest(generate, generations, max_new_tokens, sample) if generate else None
    metrics = score_delta(delta, data, model, columns, batch_size, request, task)
    if json:
        print_json(out, metrics)
    else:
        out.print(metrics_table(metrics, f"{delta} on {data}"))
        if request:
            out.print(f"generations written to {generations}")


INSPECT_EXAMPLES = """
[bold]Examples[/]

  deltacli inspect default --method lora --tree
  deltacli inspect ./llama-70b/config.json --method lora --by layer
  deltacli inspect ./llama-70b/config.json --method lora --json
  deltacli inspect runs/lora-20261126-101500
"""


@app.command(epilog=INSPECT_EXAMPLES)
def inspect(
    target: Annotated[
        str,
        typer.Argument(
            help="A model (directory, config.json, Hub id, `default`) or a delta directory."
        ),
    ],
    overrides: Overrides = None,
    method: Method = None,
    recipe: RecipeFile = None,
    by: Annotated[
        Literal["module", "layer"],
        typer.Option(help="Break the counts down by module type or by layer."),
    ] = "module",
    tree: Annotated[bool, typer.Option(help="Also show the module tree, layers folded.")] = False,
    json: Json = False,
) -> None:
    """Show what trains: totals and a per-module table, from a config alone or a saved delta.

    Models are built on the meta device, so no weight is read and any size answers at once.
    """
    from deltacli.commands.inspection import inspect_delta, inspect_model, recipe_for_model
    from deltacli.recipe import recipe_file
    from deltacli.render import delta_report, model_report, print_json
    from deltacli.storage.delta_folder import is_delta_dir

    if is_delta_dir(Path(target)):
        report = inspect_delta(Path(target))
        tables = delta_report(report)
    else:
        resolved = None
        if method or recipe or overrides:
            resolved = recipe_for_model(recipe_file(method, recipe), target, overrides or [])
        report = inspect_model(target, resolved)
        tables = model_report(report, by=by, tree=tree)
    if json:
        print_json(out, report)
    else:
        for table in tables:
            out.print(table)


RECIPES_EXAMPLES = """
[bold]Examples[/]

  deltacli recipes                      [dim]# the shipped recipes[/]
  deltacli recipes lora > my.yaml       [dim]# a recipe to edit[/]
  deltacli recipes --keys lora          [dim]# every key a lora recipe takes, with its help[/]
  deltacli recipes --keys mam --json
"""


@app.command(epilog=RECIPES_EXAMPLES)
def recipes(
    name: Annotated[
        str | None,
        typer.Argument(help="Print this recipe's YAML; with --keys, a recipe or a delta kind."),
    ] = None,
    keys: Annotated[
        bool,
        typer.Option(
            "--keys",
            help="List every recipe key (type, range, default, help); the deltas.N keys of "
            "NAME's kinds, or of every kind without NAME.",
        ),
    ] = False,
    json: Json = False,
) -> None:
    """List the shipped recipes, print one to copy and edit, or explain every key."""
    from rich.table import Table

    from deltacli.recipe import recipe_file, recipe_keys, shipped_recipes

    if keys:
        from deltacli.render import keys_table, print_json

        listed = recipe_keys(name)
        print_json(out, listed) if json else out.print(keys_table(listed, name))
        return
    if name:
        # Raw, never through rich: `deltacli recipes lora > my.yaml` must be valid YAML, and
        # rich wraps long lines at 80 columns when stdout is not a terminal.
        sys.stdout.write(recipe_file(name, None).read_text(encoding="utf-8"))
        return
    table = Table(title="shipped recipes (deltacli train --method NAME)", title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("what it trains")
    for recipe_name, path in sorted(shipped_recipes().items()):
        first = path.read_text(encoding="utf-8").splitlines()[0]
        table.add_row(recipe_name, first.lstrip("# "))
    out.print(table)


MERGE_EXAMPLES = """
[bold]Examples[/]

  deltacli merge default runs/lora merged/ --verify
  deltacli merge ./llama runs/lora-a runs/lora-b merged/ --weights 0.5,0.5 --dtype bf16
"""


@app.command(epilog=MERGE_EXAMPLES)
def merge(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="BASE DELTA [DELTA ...] OUT: a model (directory, Hub id, `default`), deltacli "
            "or PEFT delta directories applied in order, and the directory to write.",
            metavar="BASE DELTA... OUT",
        ),
    ],
    dtype: Annotated[
        Literal["same", "bf16", "fp16", "fp32"],
        typer.Option(help="Dtype of the merged weights (same: the base's)."),
    ] = "same",
    weights: Annotated[
        str | None, typer.Option(help="Comma-separated weight per delta, e.g. 0.5,0.5.")
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            help="Compare merged logits with base + delta; fail and write nothing above tolerance."
        ),
    ] = False,
    method: Annotated[
        str | None,
        typer.Option(
            help="Combine the deltas' increments instead of adding them in order: linear, "
            "task_arithmetic, ties, dare_linear or dare_ties (mergekit's definitions)."
        ),
    ] = None,
    density: Annotated[
        str | None,
        typer.Option(
            help="ties/dare: share of each delta's entries kept, in (0, 1]; one value, or "
            "comma-separated per delta."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="dare: seed of the random drop masks.")] = 0,
    as_delta: Annotated[
        bool,
        typer.Option(
            help="Write the combination as a delta instead of a model: every changed tensor "
            "(a `modules` delta), or with --rank a LoRA."
        ),
    ] = False,
    rank: Annotated[
        int | None, typer.Option(min=1, help="With --as-delta: a LoRA of this rank (SVD).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    json: Json = False,
) -> None:
    """Fold deltas into the base weights, shard by shard, in little memory.

    Streams one base tensor at a time, so peak memory is about the largest shard plus the
    deltas. Writes a normal Hugging Face directory (config, tokenizer, shard layout, index).
    Only deltas linear in the weights (LoRA, IA3, SIFT, BitFit, LayerNorm, module-wise,
    full) fold. With --method, each delta's increment is taken against the base and they are
    combined (TIES: trimmed to --density, signs elected, agreeing entries averaged).
    """
    from deltacli.commands.merge import merge as run_merge
    from deltacli.render import merge_summary, print_json

    if len(paths) < 3:
        raise DeltacliError("merge needs BASE, at least one DELTA, and OUT")
    base, *deltas, output = paths
    if rank is not None and not as_delta:
        raise DeltacliError("--rank needs --as-delta (the combination written as a LoRA)")
    if as_delta:
        _merge_as_delta(base, deltas, Path(output), weights, method, density, seed, rank,
                        overwrite, json)  # fmt: skip
        return
    report = run_merge(
        base,
        [Path(d) for d in deltas],
        Path(output),
        dtype=dtype,
        weights=_numbers(weights, "--weights", float) if weights else None,
        verify=verify,
        overwrite=overwrite,
        console=err,
        method=method,
        densities=_numbers(density, "--density", float) if density else None,
        seed=seed,
    )
    if json:
        print_json(out, report)
    else:
        out.print(merge_summary(report))


def _merge_as_delta(
    base: str,
    deltas: list[str],
    output: Path,
    weights: str | None,
    method: str | None,
    density: str | None,
    seed: int,
    rank: int | None,
    overwrite: bool,
    json: bool,
) -> None:
    from deltacli.commands.extract import combined_delta
    from deltacli.render import extract_summary, print_json

    report = combined_delta(
        base, [Path(d) for d in deltas], output, rank=rank, overwrite=overwrite, console=err,
        weights=_numbers(weights, "--weights", float) if weights else None,
        method=method, densities=_numbers(density, "--density", float) if density else None,
        seed=seed,
    )  # fmt: skip
    if json:
        print_json(out, report)
    elif isinstance(report, int):
        out.print(f"wrote a modules delta of {report} tensors to {output}")
    else:
        for table in extract_summary(report):
            out.print(table)


def _numbers(text: str, option: str, kind: type[int] | type[float]) -> list:
    """A comma-separated option as numbers, or the one line that says which option is wrong."""
    try:
        return [kind(part) for part in text.split(",")]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise DeltacliError(f"{option} must be {what} separated by commas, got {text!r}") from None


SPARSIFY_EXAMPLES = """
[bold]Examples[/]

  deltacli sparsify default runs/full runs/sparse --density 0.01 --eval sst2:validation
  deltacli sparsify ./llama ./llama-tuned sparse/ --density 0.05 --by global
  deltacli sparsify default runs/lora sparse/ --density 0.01   [dim]# densifies B·A first[/]
  deltacli sparsify --from-gradients --model default --data sst2:train --density 0.01 masks/
  deltacli train --method sift --mask masks/
"""


@app.command(epilog=SPARSIFY_EXAMPLES)
def sparsify(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="BASE TUNED OUT: the base model, the tuned model or delta, and the sparse "
            "delta to write (with --from-gradients, just OUT).",
            metavar="[BASE TUNED] OUT",
        ),
    ],
    density: Annotated[float, typer.Option(help="Share of each targeted matrix to keep.")] = 0.01,
    by: Annotated[
        Literal["matrix", "global"],
        typer.Option(help="Keep the top entries per matrix or over all of them (global)."),
    ] = "matrix",
    targets: Annotated[
        str | None,
        typer.Option(help="Comma-separated module patterns [default: every linear layer]."),
    ] = None,
    eval_data: Annotated[
        str | None,
        typer.Option("--eval", help="Score the sparse delta beside the dense one on this data."),
    ] = None,
    from_gradients: Annotated[
        bool, typer.Option(help="Save SIFT index masks chosen by gradients on --data instead.")
    ] = False,
    model: Annotated[str, typer.Option(help="With --from-gradients: the model.")] = "default",
    data: Annotated[str, typer.Option(help="With --from-gradients: the data.")] = "sst2:train",
    text: Annotated[str | None, typer.Option(help="Text column of --eval or --data.")] = None,
    label: Annotated[str | None, typer.Option(help="Label column of --eval or --data.")] = None,
    batches: Annotated[
        int, typer.Option(min=1, help="With --from-gradients: batches whose gradients choose.")
    ] = 1,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    json: Json = False,
) -> None:
    """Turn a dense update into a sparse delta, or choose SIFT masks from gradients.

    Keeps the largest |W_tuned - W_base| entries of the targeted matrices as a SIFT delta
    (indices + values) and reports how much of the update's norm survives; the task head is
    kept dense. Reads both checkpoints tensor by tensor.
    """
    from deltacli.commands.sparsify import mask_recipe, masks_from_gradients
    from deltacli.commands.sparsify import sparsify as run_sparsify
    from deltacli.render import print_json, sparsify_summary

    patterns = targets.split(",") if targets else None
    if from_gradients:
        if len(paths) != 1:
            raise DeltacliError("with --from-gradients give only OUT")
        recipe = mask_recipe(
            model, data, density, batches, patterns, {"text": text, "label": label}
        )
        shares = masks_from_gradients(recipe, Path(paths[0]), overwrite)
        if json:
            print_json(out, shares)
        else:
            out.print(f"saved masks for {len(shares)} matrices to {paths[0]}")
        return
    if len(paths) != 3:
        raise DeltacliError("sparsify needs BASE, TUNED and OUT (or --from-gradients OUT)")
    base, tuned, output = paths
    columns = {"text": text, "label": label}
    report = run_sparsify(
        base,
        tuned,
        Path(output),
        density,
        by=by,
        targets=patterns,
        eval_data=eval_data,
        columns=columns,
        overwrite=overwrite,
        console=err,
    )
    if json:
        print_json(out, report)
    else:
        for table in sparsify_summary(report):
            out.print(table)


EXTRACT_EXAMPLES = """
[bold]Examples[/]

  deltacli extract default runs/full runs/lora-r8 --rank 8 --eval sst2:validation
  deltacli extract ./llama ./llama-tuned lora/ --rank 32 --targets q_proj,v_proj
  deltacli extract default runs/sift low-rank/ --rank 16   [dim]# any linear delta[/]
"""


@app.command(epilog=EXTRACT_EXAMPLES)
def extract(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="BASE TUNED OUT: the base model, the tuned model or delta, and the LoRA to write.",
            metavar="BASE TUNED OUT",
        ),
    ],
    rank: Annotated[int, typer.Option(min=1, help="Rank r of the LoRA.")] = 8,
    targets: Annotated[
        str | None,
        typer.Option(help="Comma-separated module patterns [default: every changed linear layer]."),
    ] = None,
    eval_data: Annotated[
        str | None,
        typer.Option("--eval", help="Score the LoRA beside the dense update on this data."),
    ] = None,
    text: Annotated[str | None, typer.Option(help="Text column of --eval.")] = None,
    label: Annotated[str | None, typer.Option(help="Label column of --eval.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    json: Json = False,
) -> None:
    """Turn a dense update into a LoRA: the SVD of each changed matrix's ΔW at rank r.

    The counterpart of sparsify: keeps the largest singular directions of W_tuned - W_base
    (a fine-tuned model, or base + any delta that merges), reports the share of the update's
    norm kept per matrix, and writes a LoRA that PEFT loads. The task head is kept dense.
    """
    from deltacli.commands.extract import extract as run_extract
    from deltacli.render import extract_summary, print_json

    if len(paths) != 3:
        raise DeltacliError("extract needs BASE, TUNED and OUT")
    base, tuned, output = paths
    report = run_extract(
        base,
        tuned,
        Path(output),
        rank,
        targets=targets.split(",") if targets else None,
        eval_data=eval_data,
        columns={"text": text, "label": label},
        overwrite=overwrite,
        console=err,
    )
    if json:
        print_json(out, report)
    else:
        for table in extract_summary(report):
            out.print(table)


SWEEP_EXAMPLES = r"""
[bold]Examples[/]

  deltacli sweep --methods lora,adapter,prefix --seeds 1,2,3 --grid train.lr=1e-4,5e-4,2e-3 \
      --model ./bert --data train.csv --eval-data dev.csv -o sweeps/sst2
  [dim]# each recipe's own learning rate halved, kept and doubled[/]
  deltacli sweep --methods lora,ia3,full --grid train.lr=x0.5,x1,x2 -o sweeps/lr --dry-run
  [dim]# 8 GPUs, 8 runs at once; or each run a Slurm job (16 at once)[/]
  deltacli sweep --methods lora,adapter --seeds 1,2,3,4 --jobs 8 -o sweeps/big
  deltacli sweep --methods lora,adapter --seeds 1,2,3,4 --executor slurm --jobs 16 -o sweeps/big
  deltacli report sweeps/sst2 --csv sweeps/sst2.csv
"""


@app.command(epilog=SWEEP_EXAMPLES)
def sweep(
    overrides: Overrides = None,
    methods: Annotated[
        str | None, typer.Option(help="Comma-separated shipped recipes, e.g. lora,adapter.")
    ] = None,
    recipes: Annotated[
        list[Path] | None,
        typer.Option(
            "--recipe", "-r", help="A recipe file to include (repeatable).", dir_okay=False
        ),
    ] = None,
    seeds: Annotated[
        str, typer.Option(help="Comma-separated seeds; every point runs each.")
    ] = "42",
    grid: Annotated[
        list[str] | None,
        typer.Option(
            help="One axis: KEY=V1,V2,… (repeatable). xN multiplies each recipe's own value."
        ),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Base model for every run.")] = None,
    data: Annotated[str | None, typer.Option(help="Training data for every run.")] = None,
    eval_data: Annotated[str | None, typer.Option(help="Evaluation data for every run.")] = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The sweep folder (one run folder each).")
    ] = Path("sweeps/sweep"),
    dry_run: Annotated[
        bool, typer.Option(help="List the runs and their status; run none.")
    ] = False,
    launch: Annotated[
        str | None,
        typer.Option(
            help='Run each as its own command behind this prefix, e.g. "accelerate launch '
            '--multi_gpu --num_processes 2".'
        ),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            min=1,
            help="Runs at once, each its own command with its own GPUs (CUDA_VISIBLE_DEVICES) "
            "or its share of the CPU threads; logs in OUT/.logs.",
        ),
    ] = 1,
    executor: Annotated[
        Literal["local", "slurm", "submitit-local"],
        typer.Option(
            help="Where runs go: this machine; Slurm jobs through submitit (--jobs at once); "
            "or submitit's local executor, to try that set-up here.",
        ),
    ] = "local",
    json: Json = False,
) -> None:
    """Train every method × grid point × seed, each a normal run; report the comparison.

    Started again, a sweep skips the runs that finished and resumes the ones that stopped.
    """
    from deltacli.commands.report import collect, summarize
    from deltacli.commands.sweep import Axis, execute, listing, plan, run_recipe, write_plan
    from deltacli.render import print_json, report_table, sweep_table

    sources = [*(methods.split(",") if methods else []), *map(str, recipes or [])]
    axes = [Axis.parse(text) for text in grid or []]
    seed_list = _numbers(seeds, "--seeds", int)
    settings: dict[str, str | None] = {"model": model} if model else {}
    if data:
        settings |= {"data.train": data, "data.eval": eval_data}
    elif eval_data:
        settings["data.eval"] = eval_data
    runs = plan(sources, axes, seed_list)
    recipe_of = partial(run_recipe, overrides=overrides or [], settings=settings)
    for run in runs:
        recipe_of(run)  # every run's recipe checks out before any trains
    if dry_run:
        rows = listing(output, runs)
        print_json(out, rows) if json else out.print(sweep_table(rows, f"{len(rows)} runs"))
        return
    extra = {"methods": sources, "overrides": overrides or [], "settings": settings}
    write_plan(output, runs, axes, seed_list, extra)
    counts = execute(output, runs, recipe_of, err, launch, jobs, executor)
    err.print("sweep: " + ", ".join(f"{n} {what}" for what, n in counts.items()))
    rows = summarize(collect([output]))
    print_json(out, rows) if json else out.print(report_table(rows))


REPORT_EXAMPLES = """
[bold]Examples[/]

  deltacli report sweeps/sst2
  deltacli report runs/lora-a runs/lora-b runs/full --metric f1 --json
  deltacli report sweeps/sst2 --csv sst2.csv --plots figures/
"""


@app.command(epilog=REPORT_EXAMPLES)
def report(
    paths: Annotated[list[Path], typer.Argument(help="Run folders or sweep folders.")],
    metric: Annotated[
        str | None,
        typer.Option(help="Compare on this eval metric [default: each run's best_metric]."),
    ] = None,
    csv: Annotated[Path | None, typer.Option(help="Also write the table as CSV here.")] = None,
    plots: Annotated[
        Path | None,
        typer.Option(
            help="Folder for metric-vs-share.png and curves.png [default: the first path]."
        ),
    ] = None,
    json: Json = False,
) -> None:
    """Compare runs: per method, the best setting's metric (mean ± std over seeds), the share
    of parameters trained, best lr, speed, memory; plus the accuracy-vs-parameters figure."""
    from deltacli import plots as figures_module
    from deltacli.commands.report import check_destinations, collect, figures, summarize, write_csv
    from deltacli.render import print_json, report_table

    check_destinations(csv, plots)
    results = collect(paths, metric)
    rows = summarize(results)
    print_json(out, rows) if json else out.print(report_table(rows))
    if csv:
        write_csv(rows, csv)
    if figures_module.available():
        for made in figures(rows, results, plots or paths[0]):
            err.print(f"wrote {made}")
    else:
        err.print(f"[yellow]figures need matplotlib: {figures_module.INSTALL}[/]")


SUBSPACE_EXAMPLES = r"""
[bold]Examples[/]

  [dim]# deltas of three methods, trained on one task and base, then their shared 4-d subspace[/]
  deltacli subspace fit runs/lora runs/adapter runs/prefix -o spaces/sst2 --dim 4
  [dim]# train only z (4 numbers) and the head, through LoRA's decoder, on another task[/]
  deltacli train --method subspace deltas.0.subspace=spaces/sst2 deltas.0.through=lora \
      --data agnews-train.csv --eval-data agnews-test.csv data.text=text -o runs/z-agnews
  [dim]# that z as an ordinary LoRA or adapter delta; adapter's own solution as a LoRA[/]
  deltacli subspace decode spaces/sst2 --to adapter --delta runs/z-agnews -o runs/z-as-adapter
  deltacli subspace decode spaces/sst2 --to lora --point adapter -o runs/adapter-as-lora
  deltacli subspace landscape spaces/sst2 -o spaces/sst2-landscape --grid 11
"""

CHAT_EXAMPLES = r"""
[bold]Examples[/]

  deltacli chat runs/lora_instruct
  deltacli chat runs/lora_instruct --prompt "Is this review positive? A joyless slog." \
      --temperature 0
  deltacli chat smollm2 --system "Answer in one word."
  [dim]# in the chat:[/] /reset  /system TEXT  /exit
"""


@app.command(epilog=CHAT_EXAMPLES)
def chat(
    target: Annotated[
        str,
        typer.Argument(
            help="A delta folder (deltacli's or a PEFT adapter) or a base model.",
            metavar="BASE_OR_DELTA",
        ),
    ],
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", "-p", help="Answer this one message and exit (for scripts)."),
    ] = None,
    system: Annotated[str | None, typer.Option(help="A system prompt to start with.")] = None,
    model: Annotated[
        str | None, typer.Option(help="Replace the delta's base model (e.g. a local copy).")
    ] = None,
    temperature: Annotated[
        float, typer.Option(min=0, help="Sampling temperature; 0: greedy (reproducible).")
    ] = 0.7,
    top_p: Annotated[float, typer.Option(min=0, max=1, help="Nucleus sampling's mass.")] = 0.9,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest reply, in tokens.")] = 256,
    seed: Annotated[int | None, typer.Option(help="Seed sampling, for repeatable replies.")] = None,
) -> None:
    """Chat with a model, or base + delta (any kind, nothing merged), in the terminal.

    Turns are rendered by the model's chat template, as training rendered them; replies
    stream as they are generated. With --prompt: one reply, printed, for scripts.
    """
    from deltacli.commands.chat import Conversation, Sampling, interactive, open_chat_model

    with err.status(f"loading {escape(target)} …"):
        chat_model, tokenizer = open_chat_model(target, model)
    sampling = Sampling(temperature, top_p, max_new_tokens, seed)
    conversation = Conversation(chat_model, tokenizer, sampling, system)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if prompt is not None:
        conversation.reply(prompt, on_text=write)
        write("\n")
        return
    interactive(conversation, lambda: out.input("[bold cyan]you ›[/] "), write)


EXPORT_EXAMPLES = r"""
[bold]Examples[/]

  deltacli export runs/lora_instruct --to gguf -o export/lora_instruct
  cd export/lora_instruct && ollama create sst2-smollm -f Modelfile && ollama run sst2-smollm
  [dim]# llama.cpp itself[/]
  llama-cli -m SmolLM2-135M-Instruct.Q4_1.gguf --lora export/lora_instruct/adapter.gguf
  [dim]# any kind: merge, then export the whole model[/]
  deltacli merge BASE runs/ia3 merged && deltacli export merged --to gguf -o export/ia3
"""


@app.command(epilog=EXPORT_EXAMPLES)
def export(
    source: Annotated[
        Path,
        typer.Argument(
            help="A LoRA delta folder (deltacli's or PEFT's), or a Llama-family model folder "
            "(e.g. from `deltacli merge`).",
            metavar="DELTA_OR_MODEL",
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write.")],
    to: Annotated[
        Literal["gguf"],
        typer.Option(help="Format: gguf (llama.cpp and Ollama; with a Modelfile)."),
    ] = "gguf",
    base_gguf: Annotated[
        Path | None,
        typer.Option(
            help="A delta's base as a GGUF file, for the Modelfile's FROM [default: the "
            "delta's base, where it is a GGUF file]."
        ),
    ] = None,
    dtype: Annotated[
        Literal["f32", "f16"], typer.Option(help="Precision of the tensors written.")
    ] = "f32",
    tokenizer_pre: Annotated[
        str | None,
        typer.Option(
            help="A model's pre-tokenizer as llama.cpp names it (tokenizer.ggml.pre), where "
            "it is not GPT-2's."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace --output if it is a directory deltacli wrote.")
    ] = False,
    as_json: Json = False,
) -> None:
    """Export for llama.cpp and Ollama: a LoRA delta as a GGUF LoRA adapter, a model as GGUF.

    A delta gives adapter.gguf (llama.cpp's --lora, llama-cpp-python's lora_path) over the
    base's GGUF; a Llama-family model folder with a byte-level BPE tokenizer gives model.gguf.
    Beside either, an Ollama Modelfile. Other delta kinds: merge first (deltacli merge).
    """
    from deltacli.commands.export import export as export_gguf
    from deltacli.render import print_json

    report = export_gguf(source, output, base_gguf, dtype, overwrite, tokenizer_pre, err)
    if as_json:
        print_json(out, report)
        return
    alpha = f", alpha {report.alpha:g}" if report.alpha is not None else ""
    out.print(f"wrote {escape(report.gguf)} ({report.tensors} tensors{alpha}) and "
              f"{escape(report.modelfile)}")  # fmt: skip
    for note in report.notes:
        err.print(f"[yellow]{escape(note)}[/]")


DATA_EXAMPLES = r"""
[bold]Examples[/]

  deltacli data preview --method lora_instruct
  deltacli data preview --recipe my.yaml -n 5 data.train_on=last_assistant
  deltacli data preview --method lora_instruct --data chats.jsonl --json > preview.json
  [dim]# several sources, mixed: a ShareGPT file twice, 500 rows of a sample[/]
  deltacli data preview --method lora_instruct \
      'data.train=[{path: sharegpt.jsonl, weight: 2}, {path: sst2_chat:train, rows: 500}]'
"""

data_app = typer.Typer(
    help="Look at the data as the model will see it.", no_args_is_help=True,
    rich_markup_mode="rich",
)  # fmt: skip
app.add_typer(data_app, name="data")


@data_app.command("preview", epilog=DATA_EXAMPLES)
def data_preview(
    overrides: Overrides = None,
    method: Method = None,
    recipe: RecipeFile = None,
    model: Annotated[
        str | None, typer.Option(help="Base model whose tokenizer and template to use.")
    ] = None,
    data: Annotated[str | None, typer.Option(help="Training data, as for `train --data`.")] = None,
    eval_data: Annotated[str | None, typer.Option(help="Evaluation data, same forms.")] = None,
    examples: Annotated[
        int, typer.Option("--examples", "-n", min=0, help="How many examples to show.")
    ] = 3,
    split: Annotated[
        Literal["train", "eval"], typer.Option(help="Show examples of this set.")
    ] = "train",
    as_json: Json = False,
) -> None:
    """Show examples as training will encode them, and the counts it will use.

    Tokens the loss learns are highlighted, special tokens (end of turn, role markers) shown
    in colour; then the examples, tokens, share of tokens in the loss, examples cut at
    max_length, packing or padding efficiency, and warnings for the usual template
    mistakes (an answer whose end-of-turn token the loss never sees, a model that stops at
    another token, a tokenizer without a chat template). Reads no model weights.
    """
    from deltacli.commands.data_preview import preview_data
    from deltacli.recipe import load_recipe, recipe_file
    from deltacli.render import data_preview as render_preview
    from deltacli.render import print_json

    settings: dict[str, str | None] = {"model": model} if model else {}
    if data:
        settings |= {"data.train": data, "data.eval": eval_data}
    elif eval_data:
        settings["data.eval"] = eval_data
    resolved = load_recipe(recipe_file(method, recipe), overrides or [], settings)
    preview = preview_data(resolved, examples, split)
    if as_json:
        print_json(out, preview)
        return
    for part in render_preview(preview):
        out.print(part)


subspace_app = typer.Typer(
    help="The unified optimisation subspace shared by delta methods (Yi et al., 2022).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    epilog=SUBSPACE_EXAMPLES,
)
app.add_typer(subspace_app, name="subspace")
SpaceFolder = Annotated[Path, typer.Argument(help="A folder `deltacli subspace fit` wrote.")]


@subspace_app.command("fit", epilog=SUBSPACE_EXAMPLES)
def subspace_fit(
    deltas: Annotated[
        list[Path], typer.Argument(help="Trained deltas of two or more methods (one base, task).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The subspace folder to write.")],
    dim: Annotated[int, typer.Option(min=1, help="Dimensions of the subspace (d).")] = 4,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 500,
    lr: Annotated[float, typer.Option(min=0, help="Adam learning rate.")] = 1e-3,
    alpha: Annotated[
        float, typer.Option(min=0, help="Weight of the reconstruction term ‖θ − Dec(Enc θ)‖.")
    ] = 0.1,
    batch_size: Annotated[int, typer.Option(min=1, help="Training examples per step.")] = 8,
    eval_rows: Annotated[
        int | None, typer.Option(min=1, help="Score the points on this many eval rows [all].")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the weights, the mixtures and the data.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    json: Json = False,
) -> None:
    """Fit a d-dimensional subspace that the methods' trained deltas share.

    Learns an encoder and a linear decoder per method so that every convex mix of the
    encoded solutions, decoded as any of the methods, solves the task; then scores each
    method's own delta beside its point in the subspace.
    """
    from deltacli.commands.subspace import fit
    from deltacli.render import print_json, subspace_summary

    settings = dict(dim=dim, alpha=alpha, lr=lr, steps=steps, batch_size=batch_size, seed=seed)
    summary = fit(deltas, output, eval_rows=eval_rows, overwrite=overwrite, console=err, **settings)
    if json:
        print_json(out, summary["scores"])
    else:
        out.print(subspace_summary(summary, str(output)))


@subspace_app.command("decode", epilog=SUBSPACE_EXAMPLES)
def subspace_decode(
    space: SpaceFolder,
    to: Annotated[str, typer.Option(help="The fitted method to decode as, e.g. lora.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The delta folder to write.")],
    delta: Annotated[
        Path | None, typer.Option(help="A delta trained in the subspace: its z and head.")
    ] = None,
    point: Annotated[
        str | None, typer.Option(help="Or a fitted method's own solution (and head).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Write a point of the subspace as an ordinary delta of one fitted method.

    The result is a normal delta folder: `deltacli eval`, PEFT (for its methods) and
    `deltacli merge` (for methods linear in the weights) read it.
    """
    from deltacli.commands.subspace import decode

    decode(space, to, output, delta, point, overwrite)
    out.print(f"wrote {output}")


@subspace_app.command("landscape", epilog=SUBSPACE_EXAMPLES)
def subspace_landscape(
    space: SpaceFolder,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the JSON and PNG.")],
    through: Annotated[
        str | None, typer.Option(help="The method whose decoder reads the plane [the first].")
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="Data to score on [the fitted recipe's eval].")
    ] = None,
    grid: Annotated[int, typer.Option(min=2, help="Points along each side of the plane.")] = 11,
    rows: Annotated[int, typer.Option(min=1, help="Rows of the data scored per point.")] = 256,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Score the task over the plane of the subspace through the methods' solutions.

    Writes landscape.json (the grid) and, with matplotlib, landscape.png: a heat map with
    each method's solution marked.
    """
    from deltacli import plots
    from deltacli.commands.subspace import landscape

    landscape(space, output, data, through, grid, rows, overwrite=overwrite, console=err)
    out.print(f"wrote {output}")
    if not plots.available():
        err.print(f"[yellow]the heat map needs matplotlib: {plots.INSTALL}[/]")


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main() -> None:
    """Entry point: run the app, turning user errors, usage mistakes and interrupts into one
    line and an exit code (2 for mistakes, 130/143 for Ctrl-C/SIGTERM)."""
    from deltacli.training.interrupts import Stopped, raise_on_stop_signals

    raise_on_stop_signals()
    quiet_libraries()
    debug = os.environ.get("DELTACLI_DEBUG") == "1"
    try:
        # The name users type, however Python was started (`python -m ...`, a test runner).
        app(standalone_mode=False, prog_name="deltacli")
    except DeltacliError as error:
        if debug:
            raise
        _fail(error.label, str(error), error.exit_code)
    except click_errors.NoArgsIsHelpError:
        pass  # typer has shown the help
    except click_errors.UsageError as error:
        message = error.format_message().replace("Value error, ", "").rstrip(".")
        where = f" (see: {error.ctx.command_path} --help)" if error.ctx else ""
        _fail("error", f"{message}{where}", 2)
    except click_errors.ClickException as error:
        _fail("error", error.format_message(), error.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        _fail("interrupted", "stopped by Ctrl-C; nothing was left half-written", 130)
    except Stopped as stop:
        name = signal.Signals(stop.signum).name
        _fail("interrupted", f"stopped by {name}; nothing was left half-written", 128 + stop.signum)
    except OSError as error:
        if debug or error.errno not in _USER_OS_ERRORS:
            raise
        _fail("error", f"{error.strerror}: {error.filename or ''}".rstrip(": "), 2)


def quiet_libraries() -> None:
    """Libraries' own log lines are not deltacli's output: bitsandbytes warns on import about
    an optional CPU kernel deltacli never uses (see `models.keep_training_layout`), and
    datasets may log before deltacli's own one-line error."""
    import logging

    os.environ.setdefault("HF_DATASETS_VERBOSITY", "error")
    for name in ("bitsandbytes", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


# Operating-system errors that are the machine's state, not deltacli's bug: a full or
# read-only disk, a missing permission.
_USER_OS_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM}


def _fail(label: str, message: str, code: int) -> None:
    line = " ".join(message.split())
    err.print(f"[bold red]{label}:[/] {escape(line)}", soft_wrap=True, highlight=False)
    sys.exit(code)
