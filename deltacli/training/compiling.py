"""`train.compile`: torch.compile the model's repeated transformer layers, deltas inside.

Regional compilation: each layer (the classes transformers lists in `_no_split_modules`
that sit in a ModuleList) is compiled on its own. The layers share their code, so dynamo
traces one and reuses it for the rest, which keeps the compile time a layer's, not the
model's. The deltas' hooks and parametrizations run inside the compiled layer, because
dynamo traces a module's hooks with its forward. The embeddings, the output layer and the
loss stay eager (the chunked loss has its own memory plan).
"""

from __future__ import annotations

from torch import nn

# What compiles the traced graphs; tests check the tracing with "aot_eager" (no code
# generation) for every kind, and inductor itself for one.
BACKEND = "inductor"


def compile_layers(model: nn.Module) -> int:
    """Compile every repeated layer of `model` in place; returns how many were."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [
        layer
        for stack in model.modules()
        if isinstance(stack, nn.ModuleList)
        for layer in stack
        if type(layer).__name__ in classes
    ]
    for layer in layers:
        layer.compile(backend=BACKEND)
    return len(layers)
