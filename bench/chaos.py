"""The chaos suite's long profile: every fault, several trials each, with stress-ng on every core.

Usage: python bench/chaos.py [--profile long|short] [--trials 3] [--only NAME ...] [--json out.json]
Prints one Markdown table (one row per trial) and exits 1 if any trial broke a promise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from hicache_ha.sim import chaos  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=["long", "short"], default="long")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=[], help="scenarios whose name contains one of these words")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    profile = chaos.LONG if args.profile == "long" else chaos.SHORT
    rows, broken = [], []
    for cls in chaos.SCENARIOS:
        if args.only and not any(w.lower() in cls.name.lower() for w in args.only):
            continue
        for trial in range(args.trials):
            row = chaos.run_scenario(cls, profile, log=lambda m: print(m, file=sys.stderr, flush=True))
            rows.append(row)
            broken += [f"{row.fault} (trial {trial + 1}): {p}" for p in row.problems()]
    print(chaos.markdown(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(chaos.to_json(rows), encoding="utf-8")
    for line in broken:
        print("BROKEN:", line)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
