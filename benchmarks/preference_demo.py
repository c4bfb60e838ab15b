"""The preference demo measured: SmolLM2-135M-Instruct before and after `deltacli train
--method lora_dpo`, on the 200 bundled eval pairs.

Before training every reward is 0 (the policy is its reference), so "before" is the share of
pairs whose chosen answer the model already finds more likely, and the exact match of its
greedy answers (4 new tokens) with the chosen one; after training, the same two and DPO's
reward accuracy. The figures go to benchmarks/results/preference-demo-DATE.json.

    python benchmarks/preference_demo.py
    python benchmarks/preference_demo.py train.max_steps=30 train.beta=0.5
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rich.console import Console
from rich.table import Table

from measure import write_results


def scores(trainer, generate_count: int) -> dict:
    """The preference metrics on the eval pairs, and the exact match of greedy answers."""
    from deltacli.tasks.evaluation import evaluate, generate, generation_metrics

    metrics = evaluate(
        trainer.model, trainer.eval_batches, trainer.accelerator, trainer.task, None,
        trainer.recipe.train,
    )  # fmt: skip
    pairs = trainer.data.prompts[:generate_count]
    model = trainer.accelerator.unwrap_model(trainer.model)
    texts = generate(model, trainer.tokenizer, [p for p, _ in pairs], max_new_tokens=4)
    matched = generation_metrics(texts, [reference for _, reference in pairs])
    return {**metrics, "exact_match": matched["exact_match"], "generated": len(texts),
            "examples_of_answers": texts[:4]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="recipe key=value overrides")
    parser.add_argument("--generate", type=int, default=200, help="eval prompts to answer")
    args = parser.parse_args()

    from deltacli.recipe import load_recipe, recipe_file
    from deltacli.training.logs import MetricsLog
    from deltacli.training.trainer import Trainer

    recipe = load_recipe(recipe_file("lora_dpo", None), ["train.preview=0", *args.overrides])
    started = time.perf_counter()
    trainer = Trainer(recipe, console=None)
    before = scores(trainer, args.generate)
    summary = trainer.fit(MetricsLog(None))
    after = scores(trainer, args.generate)
    wall = time.perf_counter() - started

    table = Table(title="lora_dpo · SmolLM2-135M-Instruct · 200 SST-2 dev pairs")
    for column in ("", "log p(chosen) > log p(rejected)", "reward accuracy", "exact match"):
        table.add_column(column, justify="right")
    for stage, figures in (("before", before), ("after", after)):
        table.add_row(
            stage, f"{figures['preference_accuracy']:.1%}", f"{figures['reward_accuracy']:.1%}",
            f"{figures['exact_match']:.1%}",
        )  # fmt: skip
    console = Console()
    console.print(table)
    path = write_results(
        "preference-demo",
        "lora_dpo (SmolLM2-135M-Instruct, LoRA r=8 q/v, DPO beta 0.1) before and after "
        "training, on the 200 bundled SST-2 dev pairs",
        [{"stage": "before", **before}, {"stage": "after", **after}],
        flags={"overrides": args.overrides, "generate": args.generate},
        train={k: summary["train"][k] for k in ("steps", "seconds", "loss")},
        wall_seconds=round(wall, 1),
    )
    console.print(f"raw results: {path}")


if __name__ == "__main__":
    main()
