"""A preference run's step: the policy's log-probabilities of both answers, the reference's
(the same model with its deltas switched off, or computed once before training), and the
pairwise loss of `tasks.preference`.

The reference needs no second model: every delta kind switches off, leaving the base. Only
the specification kinds, whose deltas are the base's own tensors, keep a copy of what they
train (for `full`, the whole model: its memory is reported), unless the reference is
precomputed.
"""

from __future__ import annotations

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, send_to_device
from torch import nn

from deltacli.config.sections import TrainConfig
from deltacli.deltas import DeltaSet
from deltacli.errors import DeltacliError
from deltacli.tasks.preference import PreferenceLoss, policy_logps
from deltacli.tasks.tables import REFERENCE_COLUMNS, TaskData


class PreferenceStep:
    """The summed loss of a micro-batch of pairs, and the sums of its metrics per pair."""

    def __init__(self, deltas: DeltaSet, train: TrainConfig) -> None:
        self.deltas = deltas
        self.loss = PreferenceLoss.from_train(train)
        self.live = self.loss.needs_reference and train.reference == "base"
        if self.loss.needs_reference:
            stuck = [d.kind for d in deltas.deltas if not d.switchable]
            if stuck:
                raise DeltacliError(
                    f"a {stuck[0]} delta cannot be switched off for the reference pass that "
                    f"{self.loss.name} needs; use train.loss=simpo or orpo (no reference)"
                )
        self.held_bytes = 0

    def prepare(
        self,
        model: nn.Module,
        data: TaskData,
        collate,
        batch_size: int,
        accelerator: Accelerator,
    ) -> TaskData:
        """Before training: the reference's log-probabilities on the eval set (and the
        training set, when precomputed) as columns of the tables; what switching off needs
        is kept only for a live reference."""
        if not self.loss.needs_reference:
            return data
        self.held_bytes = self.deltas.hold_reference()
        tables = {"eval": data.eval}
        if not self.live:
            tables["train"] = data.train
        computed = {
            name: with_reference(model, self.deltas, table, collate, batch_size, accelerator)
            for name, table in tables.items()
        }
        if not self.live:
            self.deltas.release_reference()
            self.held_bytes = 0
        return TaskData(
            computed.get("train", data.train), computed["eval"], data.labels, data.truncated,
            data.prompts,
        )  # fmt: skip

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        """(summed loss, {metric: summed over the pairs}) of one micro-batch."""
        reference = batch.get("reference_logps")
        if self.live:
            reference = reference_pass(model, self.deltas, batch)
        terms = self.loss.terms(policy_logps(model, batch), reference)
        stats = {k: v.detach().sum() for k, v in terms.items() if k != "loss"}
        return terms["loss"].sum(), stats


@torch.no_grad()
def reference_pass(model: nn.Module, deltas: DeltaSet, batch: dict) -> torch.Tensor:
    """The base's summed log-probabilities of every row's answer: the deltas off, dropout
    off (the reference is a fixed policy)."""
    was_training = model.training
    model.eval()
    try:
        with deltas.switched_off():
            return policy_logps(model, batch).sums
    finally:
        model.train(was_training)


def with_reference(
    model: nn.Module,
    deltas: DeltaSet,
    table: datasets.Dataset,
    collate,
    batch_size: int,
    accelerator: Accelerator,
) -> datasets.Dataset:
    """`table` with the reference's log-probabilities of each pair's answers as columns;
    each process computes a share of the rows, and every process gets all of them."""
    rows = list(range(len(table)))
    share = rows[accelerator.process_index :: accelerator.num_processes]
    values: list[tuple[int, float, float]] = []
    for start in range(0, len(share), batch_size):
        indices = share[start : start + batch_size]
        batch = send_to_device(collate([table[i] for i in indices]), accelerator.device)
        sums = reference_pass(model, deltas, batch).double().cpu()
        chosen, rejected = sums.chunk(2)
        values += zip(indices, chosen.tolist(), rejected.tolist(), strict=True)
    if accelerator.num_processes > 1:
        values = gather_object(values)
    by_row = {index: (chosen, rejected) for index, chosen, rejected in values}
    for position, column in enumerate(REFERENCE_COLUMNS):
        if column in table.column_names:
            table = table.remove_columns(column)
        table = table.add_column(column, [by_row[i][position] for i in rows])
    return table
