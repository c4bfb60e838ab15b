"""Rebuild the SST-2 samples bundled in `deltacli/samples/` from the full GLUE files.

`sst2/` is what `deltacli train --method lora` trains on with no network: a seeded random
slice of the GLUE training set and the whole 872-row dev set, copied line for line.
`sst2_chat/` asks the same reviews as chat questions (`messages`, answered with one word) for
the instruction-tuning demo: the first `--chat-rows` training rows and 200 dev rows.
`sst2_pref/` holds the same rows as preference pairs (the preference demo): the question as
the prompt, the right one-word answer chosen and the other rejected.

    python scripts/make_sst2_sample.py ../shared/data/sst2 --rows 2000
"""

import argparse
import json
import random
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "deltacli" / "samples"
OUT = SAMPLES / "sst2"
QUESTION = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder holding GLUE SST-2 train.tsv and dev.tsv")
    parser.add_argument("--rows", type=int, default=2000, help="training rows to keep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat-rows", type=int, default=1000, help="rows of the chat sample")
    args = parser.parse_args()

    header, *rows = (args.source / "train.tsv").read_text(encoding="utf-8").splitlines(True)
    sample = random.Random(args.seed).sample(rows, args.rows)
    (OUT / "train.tsv").write_text(header + "".join(sample), encoding="utf-8")
    dev = (args.source / "dev.tsv").read_text(encoding="utf-8")
    (OUT / "validation.tsv").write_text(dev, encoding="utf-8")
    chat = SAMPLES / "sst2_chat"
    chat.mkdir(exist_ok=True)
    (chat / "train.jsonl").write_text(_as_chat(sample[: args.chat_rows]), encoding="utf-8")
    (chat / "validation.jsonl").write_text(_as_chat(dev.splitlines(True)[1:201]), encoding="utf-8")
    pairs = SAMPLES / "sst2_pref"
    pairs.mkdir(exist_ok=True)
    (pairs / "train.jsonl").write_text(_as_pairs(sample[: args.chat_rows]), encoding="utf-8")
    (pairs / "validation.jsonl").write_text(
        _as_pairs(dev.splitlines(True)[1:201]), encoding="utf-8"
    )


def _as_chat(rows: list[str]) -> str:
    """One JSON line a review: the question as the user's turn, the label as the answer."""
    lines = []
    for row in rows:
        sentence, label = row.rstrip("\n").split("\t")
        messages = [
            {"role": "user", "content": QUESTION + "Review: " + sentence.strip()},
            {"role": "assistant", "content": "positive" if label == "1" else "negative"},
        ]
        lines.append(json.dumps({"messages": messages}) + "\n")
    return "".join(lines)


def _as_pairs(rows: list[str]) -> str:
    """One JSON line a review, in TRL's conversational preference format."""
    lines = []
    for row in rows:
        sentence, label = row.rstrip("\n").split("\t")
        right, wrong = ("positive", "negative") if label == "1" else ("negative", "positive")
        record = {
            "prompt": [{"role": "user", "content": QUESTION + "Review: " + sentence.strip()}],
            "chosen": [{"role": "assistant", "content": right}],
            "rejected": [{"role": "assistant", "content": wrong}],
        }
        lines.append(json.dumps(record) + "\n")
    return "".join(lines)


if __name__ == "__main__":
    main()
