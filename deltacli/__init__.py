"""deltacli: delta tuning (parameter-efficient fine-tuning) of Hugging Face transformers.

Everything the command line does is a library call too:

    from deltacli import load_recipe, recipe_file, train
    result = train(load_recipe(recipe_file("lora", None), ["train.epochs=1"]))

Exports load on first use, so `deltacli --help` does not pay for importing torch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_recipe": "deltacli.recipe",
    "recipe_file": "deltacli.recipe",
    "train": "deltacli.training.runs",
    "TrainResult": "deltacli.training.runs",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'deltacli' has no attribute {name!r}")
