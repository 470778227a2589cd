"""Write a stratified sample of the built-in dataset as CSV: the data `make sample` runs the pipeline on."""

from __future__ import annotations

import argparse
from pathlib import Path

from nbs_lib.core.data import load_dataset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", type=Path, help="CSV file to write")
    parser.add_argument("--rows", type=int, default=150, help="rows in the sample (default 150)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    args = parser.parse_args()
    frame = load_dataset("", "target")
    share = min(1.0, args.rows / len(frame))
    sample = frame.groupby("target", group_keys=False).sample(frac=share, random_state=args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    sample.to_csv(args.output, index=False)
    print(f"{len(sample)} of {len(frame)} rows -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
