"""Turning results into rich tables (people) or JSON (machines); no logic of its own."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from deltacli.deltas.targets import collapse_indices
from deltacli.tasks.metrics import metric as metric_info
from deltacli.tasks.metrics import metric_rows

if TYPE_CHECKING:  # rendering reads reports; it need not import what produces them
    from deltacli.commands.data_preview import DataPreview
    from deltacli.commands.extract import ExtractReport
    from deltacli.commands.inspection import DeltaReport, Group, Layer, ModelReport, Node
    from deltacli.commands.merge import MergeReport
    from deltacli.commands.report import MethodRow
    from deltacli.commands.sparsify import SparsifyReport
    from deltacli.config.schema import KeyHelp


def keys_table(keys: list[KeyHelp], name: str | None) -> Table:
    """Every recipe key: how to write it, what it takes, its default, and why it is there."""
    about = f" for {name}" if name else ""
    table = Table(
        title=f"recipe keys{about} (set in YAML or as key=value after the command)",
        title_justify="left",
    )
    for column in ("key", "type", "default", "range", "what it does"):
        table.add_column(column, style="bold" if column == "key" else None, overflow="fold")
    for key in keys:
        table.add_row(key.key, key.type, key.default, key.within, key.help)
    return table


def print_json(console: Console, data: Any) -> None:
    if dataclasses.is_dataclass(data):
        data = dataclasses.asdict(data)
    elif isinstance(data, list):
        data = [dataclasses.asdict(d) if dataclasses.is_dataclass(d) else d for d in data]
    console.print_json(json.dumps(data, default=str))


def metrics_table(metrics: dict, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metric_rows(metrics):
        table.add_row(name, f"{value:.4f}")
    if "loss" in metrics:
        table.add_row("loss", f"{metrics['loss']:.4f}")
    for key in ("examples", "tokens", "generated"):
        if key in metrics:
            table.add_row(key, f"{metrics[key]:,}")
    return table


def train_summary(output: str, metrics: dict) -> Table:
    params, train, scores = metrics["params"], metrics["train"], metrics["eval"]
    table = Table(title=f"deltacli train · {metrics['recipe']}", title_justify="left")
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("model", str(metrics["model"]))
    table.add_row(
        "trainable",
        f"{params['trainable']:,} of {params['total']:,} ({params['trainable_percent']:.3f}%)",
    )
    table.add_row("steps", f"{train['steps']:,} ({train['samples']:,} samples)")
    table.add_row("train loss", f"{train['loss']:.4f}")
    table.add_row("throughput", f"{train['samples_per_second']:.1f} samples/s")
    table.add_row("best epoch", str(metrics["best_epoch"]))
    for name, value in metric_rows(scores):
        table.add_row(f"eval {name}", f"{value:.4f}")
    table.add_row("wall time", f"{metrics['wall_seconds']:.1f} s")
    table.add_row("saved to", output)
    return table


def preview_table(preview: list[dict]) -> Table:
    """Generations for a few eval prompts, before and after training."""
    table = Table(
        title="generations before and after training", title_justify="left", show_lines=True
    )
    for column in preview[0] if preview else ():  # prompt, before, after, reference
        table.add_column(column, overflow="fold")
    for row in preview:
        prompt = " ".join(row["prompt"].split())  # templates are long: their end says most
        shown = prompt if len(prompt) <= 120 else "…" + prompt[-119:]
        table.add_row(
            *(escape(text) for text in (shown, row["before"], row["after"], row["reference"]))
        )
    return table


def data_preview(preview: DataPreview) -> list:
    """Each example's tokens as the model sees them (learned ones highlighted, special ones
    in colour, line breaks marked), then the counts, the sources and the warnings."""
    shown: list = []
    for number, example in enumerate(preview.examples, 1):
        text = Text()
        for sequence in example.sequences:
            if sequence.name:
                text.append(f"{sequence.name}: ", style="bold")
            for token in sequence.tokens:
                style = ("bold magenta " if token.special else "") + (
                    "black on green" if token.learned else "dim"
                )
                text.append(token.text.replace("\n", "↵\n"), style=style)
            text.rstrip()
            text.append("\n")
        text.rstrip()
        if example.label is not None:
            text.append("\n")
            text.append(f"label: {example.label}", style="bold")
        shown.append(Panel(text, title=f"{preview.split} example {number}", title_align="left"))
    legend = Text("legend: ")
    legend.append("learned by the loss", style="black on green")
    legend.append(" · ")
    legend.append("context only", style="dim")
    legend.append(" · ")
    legend.append("<special>", style="bold magenta")
    shown += [legend, _data_stats(preview.stats)]
    if len(preview.sources) > 1 or any(s["weight"] != 1 for s in preview.sources):
        sources = Table(title="sources mixed", title_justify="left")
        for column in ("source", "rows", "weight", "in mix"):
            sources.add_column(column, justify="left" if column == "source" else "right")
        for row in preview.sources:
            sources.add_row(escape(row["source"]), f"{row['rows']:,}", f"{row['weight']:g}",
                            f"{row['in_mix']:,}")  # fmt: skip
        shown.append(sources)
    shown += [Text(f"warning: {w}", style="yellow") for w in preview.warnings]
    return shown


def _data_stats(stats: dict) -> Table:
    table = Table(title="what training will see", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    rows = [
        ("train examples", f"{stats['train_examples']:,}"),
        ("eval examples", f"{stats['eval_examples']:,}"),
        ("tokens (train)", f"{stats['tokens']:,}"),
        ("tokens in the loss", f"{stats['loss_tokens']:,} ({stats['loss_share']:.1%})"),
        (f"cut at max_length={stats['max_length']}", f"{stats['truncated']:,}"),
    ]
    if "packing_efficiency" in stats:
        rows += [("packed rows", f"{stats['train_rows']:,}"),
                 ("packing keeps", f"{stats['packing_efficiency']:.1%} of the tokens")]  # fmt: skip
    else:
        rows.append(("padding in batches", f"{stats['padding_share']:.1%} (file order)"))
    for row in rows:
        table.add_row(*row)
    return table


def merge_summary(report: MergeReport) -> Table:
    table = Table(title=f"deltacli merge -> {report.output}", title_justify="left")
    table.add_column("", style="bold")
    table.add_column("")
    for delta, weight in zip(report.deltas, report.weights, strict=True):
        table.add_row("delta", f"{delta} (weight {weight:g})")
    table.add_row("method", report.method or "added in order")
    table.add_row("dtype", report.dtype)
    table.add_row("shards", str(report.shards))
    table.add_row("tensors", f"{report.tensors_changed:,} changed, {report.tensors_added:,} added")
    table.add_row("written", _bytes(report.bytes_written))
    table.add_row("time", f"{report.seconds:.1f} s")
    if report.max_logit_difference is not None:
        table.add_row("verified", f"max |logit difference| {report.max_logit_difference:.2e}")
    return table


def sparsify_summary(report: SparsifyReport) -> list[Table]:
    summary = Table(title=f"deltacli sparsify -> {report.output}", title_justify="left")
    summary.add_column("", style="bold")
    summary.add_column("")
    kept = sum(m.kept for m in report.matrices)
    size = sum(m.size for m in report.matrices)
    summary.add_row(
        "kept", f"{kept:,} of {size:,} entries in {len(report.matrices)} matrices ({report.by})"
    )
    _update_rows(summary, report)
    for side, scores in (report.scores or {}).items():
        summary.add_row(
            f"{side} accuracy", f"{scores['accuracy']:.4f} (macro-F1 {scores['macro_f1']:.4f})"
        )
    return [summary, _per_matrix(report, "kept", lambda ms: f"{sum(m.kept for m in ms):,}")]


def extract_summary(report: ExtractReport) -> list[Table]:
    summary = Table(title=f"deltacli extract -> {report.output}", title_justify="left")
    summary.add_column("", style="bold")
    summary.add_column("")
    summary.add_row("kept", f"rank {report.rank} of {len(report.matrices)} matrices (LoRA)")
    _update_rows(summary, report)
    for side, scores in (report.scores or {}).items():
        summary.add_row(side, _headline(scores))
    return [summary, _per_matrix(report, "rank", lambda ms: str(max(m.kept for m in ms)))]


def _update_rows(summary: Table, report: SparsifyReport | ExtractReport) -> None:
    """How much of the update survives, what was left out, and any note."""
    summary.add_row("update norm kept", f"{100 * report.norm_kept:.1f}% of the targeted matrices'")
    summary.add_row("", f"{100 * report.norm_kept_overall:.1f}% of the whole update's")
    if report.dropped:
        summary.add_row(
            "left out", f"{len(report.dropped)} other changed tensors (e.g. {report.dropped[0]})"
        )
    if report.note:
        summary.add_row("note", report.note)


def _per_matrix(report: SparsifyReport | ExtractReport, kept: str, shown) -> Table:
    """Per matrix, layers folded: how many, what was kept, the update norm share kept."""
    folded: dict[str, list] = {}
    for matrix in report.matrices:
        folded.setdefault(collapse_indices(matrix.name), []).append(matrix)
    detail = Table(title="per matrix (layers folded)", title_justify="left")
    for column in ("matrix", "×", kept, "update norm kept"):
        detail.add_column(
            column, justify="left" if column == "matrix" else "right", overflow="fold"
        )
    for name, matrices in folded.items():
        shares = [m.norm_kept for m in matrices]
        detail.add_row(
            name,
            str(len(matrices)),
            shown(matrices),
            f"{100 * min(shares):.1f}–{100 * max(shares):.1f}%",
        )
    return detail


def _headline(scores: dict) -> str:
    """A task's first metric and the loss: what `extract --eval` compares."""
    rows = metric_rows(scores)
    first = f"{rows[0][0]} {rows[0][1]:.4f} · " if rows else ""
    return f"{first}loss {scores['loss']:.4f}"


def model_report(report: ModelReport, by: str = "module", tree: bool = False) -> list:
    """Totals, then the per-module (or per-layer) table, then the module tree if asked."""
    title = f"{report.model}" + (f" + {report.recipe}" if report.recipe else "")
    totals = Table(title=title, title_justify="left")
    for column in ("total", "trainable", "trainable %", "base stored as", "base memory"):
        totals.add_column(column, justify="right")
    trains_in = f" (deltas train in {report.trainable_dtype})" if report.trainable_dtype else ""
    totals.add_row(
        f"{report.total:,}",
        f"{report.trainable:,}",
        f"{report.trainable_percent:.4f}%",
        f"{report.base_dtype}{trains_in}",
        _bytes(report.base_bytes),
    )
    if by == "layer":
        detail = layers_table(report.layers, report.total)
    else:
        what = "trainable parameters by module" if report.recipe else "parameters by module"
        detail = groups_table(report.groups, what, report.total)
    return [totals, detail, *([module_tree(report.tree)] if tree else [])]


def layers_table(layers: list[Layer], total: int) -> Table:
    table = Table(title="parameters by layer", title_justify="left")
    for column in ("layer", "parameters", "trainable", "% of total"):
        table.add_column(column, justify="right")
    for row in layers:
        table.add_row(
            "outside layers" if row.layer is None else str(row.layer),
            f"{row.parameters:,}",
            f"{row.trainable:,}",
            f"{100.0 * row.parameters / total:.4f}%",
        )
    return table


def module_tree(root: Node) -> Tree:
    """The module hierarchy, parameter-free modules left out, trainable parts in green; a
    ModuleList whose layers fold into one run shows as `layer.0-11 ×12`."""
    tree = Tree(_node_label(root.name, root))
    _add_children(tree, root)
    return tree


def _add_children(branch: Tree, node: Node) -> None:
    for child in node.children:
        if child.parameters == 0:
            continue
        name, shown = child.name, child
        if child.type == "ModuleList" and len(child.children) == 1:
            shown = child.children[0]
            name = f"{child.name}.{shown.name}"
        _add_children(branch.add(_node_label(name, shown)), shown)


def _node_label(name: str, node: Node) -> str:
    repeat = f" ×{node.repeat}" if node.repeat > 1 else ""
    label = f"[bold]{escape(name)}[/]{repeat} " if name else ""
    label += f"[dim]{node.type}[/] {node.parameters:,}"
    if node.trainable:
        share = (
            "all trainable"
            if node.trainable == node.parameters
            else f"{node.trainable:,} trainable"
        )
        label += f" [green]{share}[/]"
    return label


def delta_report(report: DeltaReport) -> list[Table]:
    summary = Table(title=f"delta {report.folder}", title_justify="left")
    summary.add_column("", style="bold")
    summary.add_column("")
    summary.add_row("format", report.source)
    summary.add_row("recipe", str(report.recipe.get("name")))
    summary.add_row("methods", ", ".join(report.methods))
    summary.add_row("base model", report.base_model)
    summary.add_row("parameters", f"{report.parameters:,} in {report.tensors:,} tensors")
    summary.add_row("size on disk", _bytes(report.bytes_on_disk))
    for name, value in metric_rows(report.metrics.get("eval", {})):
        summary.add_row(f"eval {name}", f"{value:.4f}")
    for problem in report.problems:
        summary.add_row("[yellow]unreadable[/]", escape(problem))
    tables = [
        summary,
        groups_table(report.groups, "saved tensors by module", report.parameters, "% of delta"),
    ]
    if report.densities:
        tables.append(density_table(report.densities))
    return tables


def density_table(densities: dict[str, float]) -> Table:
    """Sparse deltas: the share of each kind of matrix that changed (layers folded)."""
    folded: dict[str, list[float]] = {}
    for name, share in densities.items():
        folded.setdefault(collapse_indices(name), []).append(share)
    table = Table(title="sparse increments: density per matrix", title_justify="left")
    table.add_column("matrix", overflow="fold")
    table.add_column("×", justify="right")
    table.add_column("density", justify="right")
    for name, shares in folded.items():
        low, high = min(shares), max(shares)
        shown = f"{100 * low:.3f}%" if high - low < 1e-9 else f"{100 * low:.3f}–{100 * high:.3f}%"
        table.add_row(name, str(len(shares)), shown)
    return table


def groups_table(groups: list[Group], title: str, total: int, share: str = "% of total") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("module", overflow="fold")
    table.add_column("role")
    table.add_column("×", justify="right")
    table.add_column("parameters", justify="right")
    table.add_column(share, justify="right")
    for group in groups:
        table.add_row(
            group.module,
            group.role,
            str(group.instances),
            f"{group.parameters:,}",
            f"{100.0 * group.parameters / total:.4f}%",
        )
    return table


def _bytes(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1024
    return str(count)


def sweep_table(rows: list[dict], title: str) -> Table:
    """The runs of a sweep (`--dry-run`): name, grid point, seed, status."""
    table = Table(title=title, title_justify="left")
    for column in rows[0]:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(str(value) for value in row.values()))
    return table


def report_table(rows: list[MethodRow]) -> Table:
    """Per method: what trains, the best setting's score over seeds, speed and memory."""
    metric = rows[0].metric if rows else "metric"
    table = Table(
        title=f"deltacli report · eval {metric}, best setting per method", title_justify="left"
    )
    for column in ("method", "trainable", "%", f"{metric} (mean ± std)", "seeds", "best lr",
                   "samples/s", "peak RSS", "wall"):  # fmt: skip
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        memory = f"{row.peak_rss_mb:,.0f} MB" if row.peak_rss_mb is not None else "—"
        if row.peak_gpu_gib is not None:
            memory += f" / {row.peak_gpu_gib:.1f} GiB GPU"
        table.add_row(
            row.method, f"{row.trainable:,}", f"{row.share:.3f}%",
            _spread(row.mean, row.std, percent=metric_info(row.metric).share),
            str(row.seeds), row.lr, f"{row.samples_per_second:.0f}", memory,
            f"{row.wall_seconds:.0f} s",
        )  # fmt: skip
    return table


def _spread(mean: float, std: float, percent: bool) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if percent else f"{mean:.4f} ± {std:.4f}"


def subspace_summary(summary: dict, output: str) -> Table:
    """Per fitted method: its size, its own delta's eval metric beside its point's in the
    subspace, and how far the point is from the delta it encodes."""
    metric = summary["metric"]
    table = Table(title=f"deltacli subspace fit -> {output} (d = {summary['dim']})")
    table.title_justify = "left"
    point = f"{metric} at its point"
    columns = ("method", "parameters", f"own {metric}", point, "‖θ−Dec(Enc θ)‖/‖θ‖")
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, scores in summary["scores"].items():
        table.add_row(
            name,
            f"{scores['parameters']:,}",
            f"{scores['own'][metric]:.4f}",
            f"{scores['point'][metric]:.4f}",
            f"{scores['reconstruction_error']:.3f}",
        )
    return table
