"""Fitting the unified subspace, decoding a point of it as any fitted method, and drawing
the task's landscape over it (Yi et al., 2022; reference code thunlp/Unified-DeltaTuning).

Fitting follows the paper's multi-method setting: deltas of several methods, trained apart on
one task and base, give their changes θ_m = trained_m − initial_m (a run keeps its starting
values in `initial.safetensors`). Per method an encoder Enc_m (Linear D_m→d, tanh,
Linear d→d) and a linear decoder Dec_m (d→D_m, no bias), here drawn N(0, 0.02), train together:
each step mixes the encoded solutions with random convex weights, p = Σ w_m Enc_m(θ_m), and
minimises Σ_m task loss(initial_m + Dec_m(p)) + α Σ_m ‖θ_m − Dec_m(Enc_m(θ_m))‖₂. So every
point on the methods' simplex must work through every decoder. Unlike the reference code,
methods keep their own sizes (each has its own decoder), and their task heads stay as
trained (a head tensor a method also trains, BitFit's classifier bias, stays with the
head). Training a new z is the `subspace` delta kind (deltas/subspace.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from pathlib import Path

import torch
from rich.console import Console
from torch import nn
from torch.func import functional_call

from deltacli.build import prepare_model, resolved_recipe, save_values
from deltacli.deltas import DeltaSet
from deltacli.deltas.subspace import (
    SPACE_FILE,
    TENSORS_FILE,
    Method,
    Space,
    SubspaceConfig,
    inner_deltas,
    read_space,
)
from deltacli.errors import DeltacliError
from deltacli.files.outputs import atomic_dir, check_apart, check_output, notice_on
from deltacli.files.tensors import save_tensors
from deltacli.models.loading import load_tokenizer
from deltacli.recipe import Recipe, parse_recipe, recipe_to_dict
from deltacli.storage.delta_folder import LOG_FILE, SavedDelta, read_delta
from deltacli.tasks.evaluation import evaluate
from deltacli.tasks.tables import batches, load_sources
from deltacli.training.logs import MetricsLog, progress_bars
from deltacli.training.runtime import make_accelerator
from deltacli.training.session import Session, open_session

LANDSCAPE_FILE = "landscape.json"
LANDSCAPE_FIGURE = "landscape.png"


@dataclasses.dataclass
class Fitted:
    """One method while the subspace is fitted: its model with its trained delta attached,
    θ_m, and its encoder and decoder."""

    method: Method
    recipe: Recipe
    model: nn.Module
    deltas: DeltaSet
    initial: torch.Tensor  # flat, D_m
    theta: torch.Tensor  # flat: trained − initial
    fixed: dict[str, torch.Tensor]  # saved but not trained (SIFT's indices)
    encoder: nn.Sequential
    decoder: nn.Linear

    def encode(self) -> torch.Tensor:
        return self.encoder(self.theta)

    def values(self, point: torch.Tensor) -> dict[str, torch.Tensor]:
        """initial_m + Dec_m(point), as the method's tensors."""
        return self.method.split(self.initial + self.decoder(point))

    def task_loss(self, point: torch.Tensor, batch: dict) -> torch.Tensor:
        self.model.train()
        return functional_call(self.model, self.values(point), (), batch).loss


def _fitted(saved: SavedDelta, name: str, dim: int, prepared: Session | None = None) -> Fitted:
    """One method's solution, with a fresh encoder and decoder; its model with the delta is
    `prepared`'s where the session already built it."""
    if prepared is None:
        recipe = resolved_recipe(saved)
        model, deltas = prepare_model(recipe)
    else:
        recipe, model, deltas = prepared.recipe, prepared.model, prepared.deltas
    head = set(deltas.head.params) if deltas.head else set()  # BitFit's classifier bias
    params = {n: p for d in deltas.deltas for n, p in d.params.items() if n not in head}
    keys = deltas.keys()
    fixed = {  # saved but not trained: SIFT's indices
        n: saved.tensors[keys[n]]
        for d in deltas.deltas
        for n in d.saved_names()
        if n not in d.params
    }
    starts = {n: p.detach().clone() for n, p in params.items()}  # the base's own values
    if any(not delta.initial_from_base for delta in deltas.deltas):
        initial = saved.initial()
        for delta in deltas.deltas:
            if not delta.initial_from_base:
                starts |= {n: initial[keys[n]] for n in delta.params}
    saved.load_into(deltas)
    method = Method(
        name=name,
        deltas=recipe_to_dict(recipe)["deltas"],
        names=list(params),
        shapes=[list(p.shape) for p in params.values()],
    )
    initial = method.flatten(starts)
    theta = method.flatten({n: p.detach() for n, p in params.items()}) - initial
    encoder = nn.Sequential(nn.Linear(method.size, dim), nn.Tanh(), nn.Linear(dim, dim))
    decoder = nn.Linear(dim, method.size, bias=False)
    for layer in [encoder[0], encoder[2], decoder]:
        nn.init.normal_(layer.weight, std=0.02)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    return Fitted(method, recipe, model, deltas, initial, theta, fixed, encoder, decoder)


def _names(folders: list[Path]) -> list[str]:
    """Each delta's recipe name, numbered where two share one."""
    names = [read_delta(folder).recipe.name for folder in folders]
    return [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names, 1)]


def _mixture(count: int, rng: random.Random) -> list[float]:
    """The paper's random convex weights: w₁ ~ U(0, 1), w₂ ~ U(0, 1 − w₁), …, the rest last;
    shuffled, so no method is always drawn first."""
    weights, left = [], 1.0
    for _ in range(count - 1):
        weights.append(rng.uniform(0, left))
        left -= weights[-1]
    weights.append(left)
    rng.shuffle(weights)
    return weights


def fit(
    folders: list[Path],
    output: Path,
    dim: int = 4,
    alpha: float = 0.1,
    lr: float = 1e-3,
    steps: int = 500,
    batch_size: int = 8,
    eval_rows: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    console: Console | None = None,
) -> dict:
    """Fit a `dim`-dimensional subspace to the trained deltas in `folders` (one task, one
    base), then score each method's own delta beside its point in the subspace on the
    recipes' eval data (`eval_rows` of it): what the subspace keeps of each solution."""
    check_output(output, overwrite)
    check_apart(output, [("delta", f) for f in folders])
    if len(folders) < 2:
        raise DeltacliError("a subspace is fitted to deltas of at least two methods")
    torch.manual_seed(seed)
    names = _names(folders)
    saved = [read_delta(folder) for folder in folders]
    first = resolved_recipe(saved[0])
    session = open_session(
        dataclasses.replace(first, train=dataclasses.replace(first.train, seed=seed))
    )
    fitted = [_fitted(saved[0], names[0], dim, session)]
    fitted += [_fitted(s, n, dim) for s, n in zip(saved[1:], names[1:], strict=True)]
    for other, folder in zip(fitted[1:], folders[1:], strict=True):
        if (other.recipe.model, other.recipe.task) != (first.model, first.task):
            raise DeltacliError(
                f"{folder} was trained on {other.recipe.model} ({other.recipe.task}), "
                f"{folders[0]} on {first.model} ({first.task}): fit deltas of one base and task"
            )
        for key in ("train", "eval", "labels"):
            theirs, ours = getattr(other.recipe.data, key), getattr(first.data, key)
            if theirs != ours:
                raise DeltacliError(
                    f"{folder} was trained with data.{key}={theirs}, {folders[0]} with "
                    f"data.{key}={ours}: fit deltas trained on the same data and labels"
                )
    tokenizer, task, data = session.tokenizer, session.task, session.data
    loader = session.batches(data.train, batch_size, shuffle=True)
    weights = [p for f in fitted for m in (f.encoder, f.decoder) for p in m.parameters()]
    optimizer = torch.optim.Adam(weights, lr=lr)
    rng = random.Random(seed)
    with atomic_dir(output, overwrite, "fitted subspace", notice_on(console)) as scratch:
        with MetricsLog(scratch / LOG_FILE) as log, progress_bars(console) as progress:
            bar = progress.add_task("fit subspace", total=steps, loss=0.0, lr=lr, speed=0.0)
            stream = itertools.chain.from_iterable(itertools.repeat(loader))
            for step, batch in zip(range(1, steps + 1), stream, strict=False):
                mix = _mixture(len(fitted), rng)
                point = sum(w * f.encode() for w, f in zip(mix, fitted, strict=True))
                task_losses = [f.task_loss(point, batch) for f in fitted]
                errors = [torch.linalg.vector_norm(f.theta - f.decoder(f.encode())) for f in fitted]
                loss = sum(task_losses) + alpha * sum(errors)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                log.write(
                    step=step,
                    loss=loss.item(),
                    task_loss={n: v.item() for n, v in zip(names, task_losses, strict=True)},
                    reconstruction={n: v.item() for n, v in zip(names, errors, strict=True)},
                )
                progress.update(bar, advance=1, loss=loss.item())
        scores = _score_points(fitted, data.eval, tokenizer, eval_rows, console)
        tensors = {}
        with torch.no_grad():
            for f in fitted:
                name = f.method.name
                tensors[f"{name}.point"] = f.encode()
                tensors[f"{name}.init"] = f.initial
                tensors[f"{name}.decoder"] = f.decoder.weight
                for key, value in f.encoder.state_dict().items():
                    tensors[f"{name}.encoder.{key}"] = value
                tensors |= {f"{name}.fixed.{key}": value for key, value in f.fixed.items()}
                if f.deltas.head:
                    for key, value in f.deltas.head.params.items():
                        tensors[f"{name}.head.{key}"] = value
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        save_tensors(tensors, scratch / TENSORS_FILE, metadata={"format": "pt"})
        summary = {
            "dim": dim,
            "metric": task.metrics[0],
            "base": first.model,
            "task": first.task,
            "head": first.head,
            "data": recipe_to_dict(first)["data"],
            "fitted_from": {f.method.name: str(p) for f, p in zip(fitted, folders, strict=True)},
            "settings": {
                "alpha": alpha,
                "lr": lr,
                "steps": steps,
                "batch_size": batch_size,
                "seed": seed,
            },
            "scores": scores,
            "methods": [dataclasses.asdict(f.method) for f in fitted],
        }
        (scratch / SPACE_FILE).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def _score_points(
    fitted: list[Fitted], table, tokenizer, rows: int | None, console: Console | None
) -> dict[str, dict]:
    """Per method: its own delta's eval metrics, its point's (initial + Dec(Enc(θ))), the
    point's relative distance to θ, and its size."""
    if rows is not None:
        table = table.select(range(min(rows, len(table))))
    task = fitted[0].recipe.task_entry
    accelerator = make_accelerator()
    loader = batches(table, task.collate(tokenizer, table), 64, False)
    scores = {}
    with progress_bars(console) as progress:
        bar = progress.add_task("score the points", total=2 * len(fitted))
        for f in fitted:
            labels = f.recipe.data.labels
            own = evaluate(f.model, loader, accelerator, task, labels)
            progress.advance(bar)
            with torch.no_grad():
                decoded = f.decoder(f.encode())
                distance = float(torch.linalg.vector_norm(f.theta - decoded) / f.theta.norm())
                trained = {n: p.detach().clone() for n, p in f.deltas.parameters().items()}
                f.deltas.set_values({**trained, **f.method.split(f.initial + decoded)})
            at_point = evaluate(f.model, loader, accelerator, task, labels)
            with torch.no_grad():
                f.deltas.set_values(trained)
            progress.advance(bar)
            scores[f.method.name] = {
                "parameters": f.method.size,
                "own": own,
                "point": at_point,
                "reconstruction_error": distance,
            }
    return scores


def decode(
    space_folder: Path,
    to: str,
    output: Path,
    z_delta: Path | None = None,
    point: str | None = None,
    overwrite: bool = False,
) -> Path:
    """A point of the subspace as an ordinary delta of method `to`: initial + Dec_to(z). The
    point is the z a `subspace` delta trained (`z_delta`, with that run's task head) or a
    fitted method's own solution (`point`, with its head): LoRA's solution as an adapter.
    The result loads in `eval`, in PEFT where PEFT has the method, and in `merge` where the
    method is linear in the weights."""
    if (z_delta is None) == (point is None):
        raise DeltacliError("decode one point: a delta trained in the subspace, or --point")
    check_output(output, overwrite)
    inputs = [("fitted space", space_folder), *([("delta", z_delta)] if z_delta else [])]
    check_apart(output, inputs)
    space = read_space(space_folder)
    method = space.method(to)
    if z_delta is not None:
        saved = read_delta(z_delta)
        if [c.kind for c in saved.recipe.deltas] != [SubspaceConfig.kind]:
            raise DeltacliError(f"{z_delta} is not a delta trained in a subspace")
        recipe = resolved_recipe(saved)
        _, deltas = prepare_model(recipe, meta=True)
        values = saved.values_for(deltas)  # z and the run's task head
        z = values.pop(next(iter(deltas.deltas[0].params)))
        source = {"delta": str(z_delta)}
    else:
        z = space.point(space.method(point).name)
        values = space.head(point)
        recipe = _space_recipe(space, point)
        source = {"point": point}
    recipe = dataclasses.replace(
        recipe, name=f"{to}-decoded", deltas=[d.config for d in inner_deltas(method)]
    )
    decoded = {**space.decode(to, z), **space.fixed(to), **values}
    with atomic_dir(output, overwrite, "decoded delta") as scratch:
        provenance = {"decoded": {"subspace": str(space_folder), "to": to, **source}}
        save_values(scratch, recipe, decoded, provenance, output)
    return output


def _space_recipe(space: Space, through: str) -> Recipe:
    """The recipe of a `subspace` delta through `through`, on the fitted base, task and data."""
    return parse_recipe(
        {
            "name": f"subspace-{through}",
            "model": space.info["base"],
            "task": space.info["task"],
            "head": space.info["head"],
            "data": space.info["data"],
            "deltas": [
                {"kind": SubspaceConfig.kind, "subspace": str(space.folder), "through": through}
            ],
        }
    )


def landscape(
    space_folder: Path,
    output: Path,
    data: str | None = None,
    through: str | None = None,
    grid: int = 11,
    rows: int | None = 256,
    batch_size: int = 64,
    overwrite: bool = False,
    console: Console | None = None,
) -> dict:
    """The task's first metric over the plane of the subspace through the methods' solutions
    (the first three; with two, a second direction orthogonal to their line), reached
    through one method's decoder with its trained head (the paper's Figure 3): JSON of the
    grid, and a heat map where matplotlib is installed."""
    from deltacli import plots

    check_output(output, overwrite)
    space = read_space(space_folder)
    names = list(space.methods)
    through = space.method(through or names[0]).name
    points = torch.stack([space.point(n) for n in names]).float()
    origin, axes = _plane(points)
    coords = (points - origin) @ axes.T
    low, high = coords.min(0).values, coords.max(0).values
    margin = 0.5 * (high - low).clamp(min=1e-3)
    a_values = torch.linspace(float(low[0] - margin[0]), float(high[0] + margin[0]), grid)
    b_values = torch.linspace(float(low[1] - margin[1]), float(high[1] + margin[1]), grid)
    recipe = _space_recipe(space, through)
    source = data or recipe.data.eval
    tokenizer = load_tokenizer(recipe.model)
    table = load_sources(source, recipe.data.hub_config, recipe.train.seed)
    if rows is not None:
        table = table.select(range(min(rows, len(table))))
    task = recipe.task_entry
    encoded, labels = task.for_scoring(table, recipe.data, tokenizer, source)
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, labels=labels))
    model, deltas = prepare_model(recipe)
    if deltas.head:
        deltas.head.load(space.head(through))
    (z,) = deltas.deltas[0].params.values()
    accelerator = make_accelerator()
    loader = batches(encoded, task.collate(tokenizer, encoded), batch_size, False)
    metric = task.metrics[0]
    values = []
    with progress_bars(console) as progress:
        bar = progress.add_task(f"landscape through {through}", total=grid * grid)
        for a in a_values:
            row = []
            for b in b_values:
                with torch.no_grad():
                    z.copy_(origin + a * axes[0] + b * axes[1])
                row.append(evaluate(model, loader, accelerator, task, labels)[metric])
                progress.advance(bar)
            values.append(row)
    result = {
        "metric": metric,
        "through": through,
        "data": source,
        "rows": len(encoded),
        "a": a_values.tolist(),
        "b": b_values.tolist(),
        "values": values,  # values[i][j]: at origin + a[i]·axes[0] + b[j]·axes[1]
        "points": {n: coords[i].tolist() for i, n in enumerate(names)},
        "origin": origin.tolist(),
        "axes": axes.tolist(),
    }
    with atomic_dir(output, overwrite, "subspace landscape") as scratch:
        (scratch / LANDSCAPE_FILE).write_text(json.dumps(result, indent=1), encoding="utf-8")
        if plots.available():
            plots.landscape(result, scratch / LANDSCAPE_FIGURE)
    return result


def _plane(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An origin and two orthonormal directions spanning (a plane through) the points."""
    origin = points[0]
    directions = [points[i] - origin for i in range(1, min(3, len(points)))]
    if len(directions) == 1:
        directions.append(torch.randn(points.shape[1], generator=torch.Generator().manual_seed(0)))
    first = directions[0] / directions[0].norm().clamp(min=1e-12)
    second = directions[1] - (directions[1] @ first) * first
    return origin, torch.stack([first, second / second.norm().clamp(min=1e-12)])
