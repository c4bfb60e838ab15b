"""Rebuild the SST-2 sample bundled in `deltacli/samples/sst2/` from the full GLUE files.

The sample is what `deltacli train --method lora` trains on with no network: a seeded random
slice of the GLUE training set and the whole 872-row dev set, copied line for line.

    python scripts/make_sst2_sample.py ../shared/data/sst2 --rows 2000
"""

import argparse
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "deltacli" / "samples" / "sst2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder holding GLUE SST-2 train.tsv and dev.tsv")
    parser.add_argument("--rows", type=int, default=2000, help="training rows to keep")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    header, *rows = (args.source / "train.tsv").read_text(encoding="utf-8").splitlines(True)
    sample = random.Random(args.seed).sample(rows, args.rows)
    (OUT / "train.tsv").write_text(header + "".join(sample), encoding="utf-8")
    dev = (args.source / "dev.tsv").read_text(encoding="utf-8")
    (OUT / "validation.tsv").write_text(dev, encoding="utf-8")


if __name__ == "__main__":
    main()
