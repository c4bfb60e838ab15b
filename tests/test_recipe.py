"""Recipes: shipped files load, overrides parse and type-check, bad keys get suggestions."""

import pytest
import yaml

from deltacli.deltas.lora import LoraConfig
from deltacli.errors import DeltacliError
from deltacli.recipe import (
    dump_recipe,
    load_recipe,
    parse_recipe,
    recipe_file,
    shipped_recipes,
)


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_loads_and_round_trips(name):
    recipe = load_recipe(recipe_file(name, None))
    assert recipe.name == name
    assert recipe.deltas
    assert parse_recipe(yaml.safe_load(dump_recipe(recipe))) == recipe


def test_the_shipped_methods_include_the_foundation_four():
    assert {"lora", "bitfit", "layernorm", "full"} <= set(shipped_recipes())


def test_overrides_set_nested_keys_list_items_and_types():
    recipe = load_recipe(
        recipe_file("lora", None),
        ["train.lr=1e-4", "deltas.0.r=16", "deltas.0.targets=[query, key]", "train.epochs=1"],
    )
    assert recipe.train.lr == pytest.approx(1e-4)  # PyYAML reads 1e-4 as a string
    assert recipe.train.epochs == 1.0 and isinstance(recipe.train.epochs, float)
    assert recipe.deltas[0] == LoraConfig(r=16, targets=["query", "key"])


def test_an_override_can_append_a_second_delta():
    recipe = load_recipe(recipe_file("lora", None), ["deltas.1.kind=bitfit"])
    assert [d.kind for d in recipe.deltas] == ["lora", "bitfit"]


def test_null_override_clears_an_optional_key():
    recipe = load_recipe(recipe_file("lora", None), ["data.eval=null"])
    assert recipe.data.eval is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        ("deltas.0.rank=4", "unknown key 'deltas.0.rank'"),
        ("deltas.0.r=four", "deltas.0.r must be an integer, got 'four'"),
        ("deltas.0.r=2.5", "deltas.0.r must be an integer"),
        ("train.keep_best=maybe", "train.keep_best must be true or false"),
        (
            "train.best_metric=f2",
            "train.best_metric for sequence-classification must be one of accuracy, f1, macro_f1, weighted_f1, mcc, loss (or auto); got 'f2'",
        ),
        ("deltas.3.r=4", "'deltas.3' is out of range"),
        ("deltas.0.kind=lorra", "unknown delta kind 'lorra' (did you mean 'lora'?)"),
        ("train.lr=0", "train.lr must be positive"),
        ("deltas.0.r=0", "lora r must be at least 1"),
        ("train", "must look like key=value"),
        ("model.name=x", "cannot set 'model.name'"),
    ],
)
def test_bad_overrides_say_what_is_wrong(override, message):
    with pytest.raises(DeltacliError, match=None) as error:
        load_recipe(recipe_file("lora", None), [override])
    assert message in str(error.value)


def test_unknown_method_suggests_the_closest():
    with pytest.raises(DeltacliError, match="did you mean 'bitfit'"):
        recipe_file("bitfti", None)


def test_recipe_without_deltas_is_refused(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("model: default\n")
    with pytest.raises(DeltacliError, match="lists no deltas"):
        load_recipe(path)


def test_invalid_yaml_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("deltas: [\n")
    with pytest.raises(DeltacliError, match="is not valid YAML") as error:
        load_recipe(path)
    assert "\n" not in str(error.value)


# Recipes that attach only once a file of the user's is named (tests/test_subspace.py).
NEEDS_A_FILE = {"subspace"}


@pytest.mark.parametrize("name", sorted(set(shipped_recipes()) - NEEDS_A_FILE))
def test_every_shipped_recipe_attaches_to_a_model_of_its_task(name, tiny_bert, tiny_llama):
    from deltacli.commands.inspection import inspect_model

    task = load_recipe(recipe_file(name, None)).task
    model = tiny_bert if task == "sequence-classification" else tiny_llama
    recipe = load_recipe(recipe_file(name, None), [f"model={model}"])
    report = inspect_model(str(model), recipe)
    roles = {group.role for group in report.groups}
    assert 0 < report.trainable <= report.total
    assert {d.kind for d in recipe.deltas} <= roles


def test_typed_settings_arrive_exactly_as_typed():
    recipe = load_recipe(
        recipe_file("lora", None),
        [],
        {"data.train": "a #1.csv", "deltas.0.targets": [r"re:.*\.query"], "data.eval": None},
    )
    assert recipe.data.train == "a #1.csv" and recipe.data.eval is None
    assert recipe.deltas[0].targets == [r"re:.*\.query"]


def test_a_yaml_comment_in_an_override_is_named_with_the_quoted_form():
    with pytest.raises(DeltacliError) as error:
        load_recipe(recipe_file("lora", None), ["data.text=#1 String"])
    message = str(error.value)
    assert "YAML reads everything from '#' on as a comment" in message
    assert """'data.text="#1 String"'""" in message
    quoted = load_recipe(recipe_file("lora", None), ['data.text="#1 String"'])
    assert quoted.data.text == "#1 String"


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan"])
def test_numbers_must_be_finite(value):
    with pytest.raises(DeltacliError, match=r"train\.lr must be a finite number"):
        load_recipe(recipe_file("lora", None), [f"train.lr={value}"])
