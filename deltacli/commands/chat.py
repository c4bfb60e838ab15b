"""`deltacli chat`: talk to a base model or base + delta, in a terminal or one prompt at a time.

The delta is attached as training attached it (any kind, nothing merged), and every turn is
rendered by the same chat template training used (`generation.chat_text`, deltacli's plain
template where the tokenizer has none), so a one-shot reply equals `eval --generate` on the
same prompt. Replies stream token by token; the conversation keeps its history until
`/reset`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import datasets
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, TextStreamer

from deltacli.errors import DeltacliError
from deltacli.models.loading import load_model, load_tokenizer
from deltacli.recipe import Recipe
from deltacli.storage.delta_folder import is_delta_dir, read_delta
from deltacli.tasks.generation import chat_text
from deltacli.tasks.registry import CAUSAL_LM
from deltacli.tasks.tables import TaskData
from deltacli.training.session import open_session

HELP = (
    "/reset  forget the conversation · /system TEXT  set the system prompt (/system alone "
    "clears it) · /exit  leave (or Ctrl-D) · Ctrl-C stops a reply"
)


@dataclasses.dataclass
class Sampling:
    """How replies are drawn: greedy at temperature 0, sampled otherwise."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    seed: int | None = None

    def options(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


def open_chat_model(
    target: str, model: str | None = None
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A causal LM to chat with: base + the delta saved in `target` (deltacli's or PEFT's;
    `model` replaces the base it names), or the model `target` names itself."""
    folder = Path(target)
    if folder.is_dir() and is_delta_dir(folder):
        saved = read_delta(folder, model)
        _check_generative(saved.recipe, target)
        session = open_session(saved.recipe, data=_no_data)
        saved.load_into(session.deltas)
        return session.model.eval(), session.tokenizer
    if model is not None:
        raise DeltacliError("--model replaces a delta's base; give a delta folder to chat with")
    base = load_model(target, CAUSAL_LM.name, None)
    return base.eval(), load_tokenizer(target)


def _check_generative(recipe: Recipe, target: str) -> None:
    task = recipe.task_entry
    if not task.generative or task.labels_in_forward:
        raise DeltacliError(
            f"{target} is a {task.name} delta; chat needs a causal language model's "
            "(task causal-lm or preference)"
        )


def _no_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> TaskData:
    empty = datasets.Dataset.from_dict({})
    return TaskData(train=empty, eval=empty, labels=None)


class Conversation:
    """The turns so far, and the next reply."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, sampling: Sampling,
                 system: str | None = None) -> None:  # fmt: skip
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.system = system
        self.turns: list[dict[str, str]] = []

    def reset(self) -> None:
        self.turns = []

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns

    def prompt(self, text: str) -> str:
        """The conversation with `text` as the user's next turn, ready for the reply."""
        messages = [*self.messages(), {"role": "user", "content": text}]
        return chat_text(self.tokenizer, messages, generation_prompt=True)

    @torch.no_grad()
    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """The model's answer to `text`, streamed to `on_text` as it is generated; kept in the
        history unless generation is interrupted."""
        if self.sampling.seed is not None:
            torch.manual_seed(self.sampling.seed)
        device = next(self.model.parameters()).device
        inputs = self.tokenizer(self.prompt(text), return_tensors="pt").to(device)
        inputs.pop("token_type_ids", None)
        streamer = _Streamer(self.tokenizer, on_text) if on_text else None
        output = self.model.generate(
            **inputs,
            max_new_tokens=self.sampling.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            streamer=streamer,
            **self.sampling.options(),
        )
        answer = self.tokenizer.decode(
            output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        self.turns += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer


class _Streamer(TextStreamer):
    """transformers' streamer, writing to a callback instead of stdout."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, on_text: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.on_text(text)


def command(conversation: Conversation, line: str) -> str | None:
    """Carry out a /command; the message to show, or None to leave."""
    name, _, argument = line.partition(" ")
    if name in ("/exit", "/quit", "/bye"):
        return None
    if name == "/reset":
        conversation.reset()
        return "conversation reset"
    if name == "/system":
        conversation.system = argument.strip() or None
        conversation.reset()
        shown = f"system prompt set: {conversation.system}" if conversation.system else "cleared"
        return shown + " (conversation reset)"
    return HELP


def interactive(conversation: Conversation, ask: Callable[[], str],
                write: Callable[[str], None]) -> None:  # fmt: skip
    """Read lines with `ask` until /exit or end of input; write replies as they stream."""
    write(HELP + "\n")
    while True:
        try:
            line = ask().strip()
        except EOFError:
            write("\n")
            return
        if not line:
            continue
        if line.startswith("/"):
            message = command(conversation, line)
            if message is None:
                return
            write(message + "\n")
            continue
        try:
            write("assistant › ")
            conversation.reply(line, on_text=write)
        except KeyboardInterrupt:
            write(" [stopped]")
        write("\n")
