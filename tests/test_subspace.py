"""The unified subspace: fitting it to deltas of several methods, training only z through
any method's decoder, decoding a point as an ordinary delta, and the landscape over it."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from deltacli.build import prepare_model, resolved_recipe
from deltacli.commands.subspace import decode, fit, landscape
from deltacli.deltas.subspace import read_space
from deltacli.recipe import parse_recipe, recipe_to_dict
from deltacli.storage.delta_folder import WEIGHTS_FILE, read_delta
from deltacli.training.runs import train
from helpers import assert_close, batch, logits64, tiny_recipe

METHODS = {
    "lora": [{"kind": "lora", "r": 2}],
    "adapter": [  # Houlsby: two deltas make one method
        {"kind": "adapter", "at": "attention", "r": 4},
        {"kind": "adapter", "at": "ffn", "r": 4},
    ],
    "prefix": [{"kind": "prefix", "length": 2}],
    "bitfit": [{"kind": "bitfit"}],  # starts from the base's own biases
    "sift": [{"kind": "sift", "density": 0.1, "select": "magnitude"}],  # z moves its k values
}
DIM = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert, sentiment):
    root = tmp_path_factory.mktemp("methods")
    folders = {}
    for name, deltas in METHODS.items():
        recipe = tiny_recipe(tiny_bert, sentiment, *deltas, epochs=1)
        folders[name] = root / name
        train(parse_recipe({**_plain(recipe), "name": name}), folders[name])
    return folders


def _plain(recipe) -> dict:
    return recipe_to_dict(recipe)


@pytest.fixture(scope="module")
def space(tmp_path_factory, trained):
    folder = tmp_path_factory.mktemp("space") / "sst"
    summary = fit(list(trained.values()), folder, dim=DIM, steps=30, lr=1e-2, seed=1)
    return folder, summary


def inputs():
    return batch(lengths=(9, 6, 8), seed=3, high=27)


def z_recipe(tiny_bert, sentiment, folder, through, **settings):
    subspace = {"kind": "subspace", "subspace": str(folder), "through": through}
    return tiny_recipe(tiny_bert, sentiment, subspace, **settings)


def test_fitting_shrinks_the_reconstruction_and_keeps_each_solution(space):
    folder, summary = space
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for name in METHODS:
        first, last = records[0]["reconstruction"][name], records[-1]["reconstruction"][name]
        assert last < 0.5 * first, name
        scores = summary["scores"][name]
        assert scores["reconstruction_error"] < 0.5
        assert scores["point"]["accuracy"] >= scores["own"]["accuracy"] - 0.1
    assert read_space(folder).tensors["lora.decoder"].shape[1] == DIM


@pytest.mark.parametrize("through", sorted(METHODS))
def test_the_origin_is_the_method_as_its_run_started(space, trained, tiny_bert, sentiment, through):
    """z = 0 decodes to init_m: the method's tensors as its own run began (LoRA's random A
    and zero B, the base's own biases), so training in the subspace starts where it did."""
    folder, _ = space
    subspace_model, deltas = prepare_model(z_recipe(tiny_bert, sentiment, folder, through))
    assert set(deltas.parameters()) == {"subspace.z", "classifier.weight", "classifier.bias"}
    saved = read_delta(trained[through])
    model, started = prepare_model(resolved_recipe(saved))
    initial, keys = saved.initial() if through != "bitfit" else {}, started.keys()
    for delta in started.deltas:
        if not delta.initial_from_base:
            delta.load({n: initial[keys[n]] for n in delta.saved_names()})
    assert_close(logits64(subspace_model.eval(), inputs()), logits64(model.eval(), inputs()))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_kind_at_a_point_is_the_delta_decoded_there(
    space, tiny_bert, sentiment, tmp_path, method
):
    """Through the subspace kind (parametrizations; SIFT writing its k entries each pass) and
    as an ordinary delta of the method, one point gives one model."""
    folder, _ = space
    fitted = read_space(folder)
    model, deltas = prepare_model(z_recipe(tiny_bert, sentiment, folder, method))
    deltas.head.load(fitted.head(method))
    with torch.no_grad():
        model.eval()(**inputs())  # a pass at z = 0 first: the next must not reuse its tensors
        deltas.deltas[0].params["subspace.z"].copy_(fitted.point(method))
    decode(folder, method, tmp_path / "decoded", point=method)
    saved = read_delta(tmp_path / "decoded")
    plain, plain_deltas = prepare_model(resolved_recipe(saved))
    saved.load_into(plain_deltas)
    assert_close(logits64(model.eval(), inputs()), logits64(plain.eval(), inputs()))


def test_training_z_moves_only_z_and_the_head(space, tiny_bert, sentiment, tmp_path):
    folder, _ = space
    result = train(z_recipe(tiny_bert, sentiment, folder, "lora", epochs=1), tmp_path / "z")
    assert result.metrics["params"]["trainable"] == DIM + 2 * 32 + 2
    tensors = load_file(tmp_path / "z" / WEIGHTS_FILE)
    (z,) = [value for key, value in tensors.items() if key.endswith("subspace.z")]
    assert z.shape == (DIM,) and z.abs().max() > 0
    assert len(tensors) == 3  # z, the classifier's weight and bias: nothing else


@pytest.fixture(scope="module")
def z_run(space, tiny_bert, sentiment, tmp_path_factory):
    folder, _ = space
    output = tmp_path_factory.mktemp("z") / "run"
    train(z_recipe(tiny_bert, sentiment, folder, "lora", epochs=1), output)
    return output


@pytest.mark.parametrize("to", ["lora", "adapter", "bitfit", "sift"])
def test_a_trained_z_decodes_to_a_delta_with_its_outputs(space, z_run, tmp_path, to):
    """Decoded through the same method, the ordinary delta gives the z run's logits; through
    another, a delta of that method that loads and runs."""
    folder, _ = space
    decode(folder, to, tmp_path / "decoded", z_delta=z_run)
    decoded = read_delta(tmp_path / "decoded")
    assert [c.kind for c in decoded.recipe.deltas] == [d["kind"] for d in METHODS[to]]
    model, deltas = prepare_model(resolved_recipe(decoded))
    decoded.load_into(deltas)
    z_saved = read_delta(z_run)
    z_model, z_deltas = prepare_model(resolved_recipe(z_saved))
    z_saved.load_into(z_deltas)
    same = assert_close if to == "lora" else _differ
    same(logits64(model.eval(), inputs()), logits64(z_model.eval(), inputs()))


def _differ(actual, expected):
    assert (actual - expected).abs().max() > 1e-4


def test_a_decoded_lora_loads_in_peft(space, z_run, tmp_path, tiny_bert):
    folder, _ = space
    decode(folder, "lora", tmp_path / "decoded", z_delta=z_run)
    saved = read_delta(tmp_path / "decoded")
    model, deltas = prepare_model(resolved_recipe(saved))
    saved.load_into(deltas)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "decoded").eval()
    assert_close(logits64(model.eval(), inputs()), logits64(peft_model, inputs()))


def test_one_method_s_solution_decodes_as_another(cli, space, tmp_path, sentiment):
    folder, _ = space
    code, _, _ = cli("subspace", "decode", folder, "--to", "lora", "--point", "adapter",
                     "-o", tmp_path / "adapter-as-lora")  # fmt: skip
    assert code == 0
    code, stdout, _ = cli("eval", "--delta", tmp_path / "adapter-as-lora", "--data",
                          sentiment["eval"], "--json")  # fmt: skip
    assert code == 0
    assert json.loads(stdout)["accuracy"] > 0.5


def test_the_landscape_scores_a_grid_around_the_solutions(space, tmp_path):
    folder, _ = space
    result = landscape(folder, tmp_path / "land", grid=3, rows=16)
    assert len(result["values"]) == 3 and all(len(row) == 3 for row in result["values"])
    assert all(0 <= value <= 1 for row in result["values"] for value in row)
    for x, y in result["points"].values():
        assert result["a"][0] <= x <= result["a"][-1] and result["b"][0] <= y <= result["b"][-1]
    assert json.loads((tmp_path / "land" / "landscape.json").read_text()) == result
    assert (tmp_path / "land" / "landscape.png").stat().st_size > 0


def test_mistakes_exit_2_with_their_reason(cli, space, trained, tmp_path, tiny_bert, sentiment):
    folder, _ = space
    cases = [
        (("subspace", "fit", trained["lora"], "-o", tmp_path / "a"), "at least two methods"),
        (("subspace", "decode", folder, "--to", "ia3", "--point", "lora", "-o", tmp_path / "b"),
         "has no method 'ia3'"),
        (("subspace", "decode", folder, "--to", "lora", "--delta", trained["lora"],
          "-o", tmp_path / "c"), "not a delta trained in a subspace"),
        (("subspace", "decode", folder, "--to", "lora", "-o", tmp_path / "d"), "decode one point"),
        (("subspace", "landscape", tmp_path, "-o", tmp_path / "e"), "is not a subspace"),
        (("train", "--method", "subspace", "-o", tmp_path / "f"), "needs `subspace`"),
    ]  # fmt: skip
    for args, message in cases:
        code, _, stderr = cli(*args)
        assert code == 2, args
        assert message in " ".join(stderr.split()), stderr
