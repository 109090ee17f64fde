"""The chaos suite's long profile: every fault, several trials each, with stress-ng on every core.

Usage: python bench/chaos.py [--profile long|short] [--trials 3] [--engine sim|sglang|both] [--only NAME ...]
                             [--json out.json]
The engine: the simulator (every fault), SGLang's own HiCacheController (SIGKILL and SIGSTOP, in two rank
processes started once), or both (the default). Prints one Markdown table (one row per trial) and exits 1
if any trial broke a promise.
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
    ap.add_argument("--engine", choices=["sim", "sglang", "both"], default="both")
    ap.add_argument("--only", nargs="*", default=[], help="scenarios whose name contains one of these words")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    profile = chaos.LONG if args.profile == "long" else chaos.SHORT
    rows, broken = [], []

    def wanted(cls) -> bool:
        return not args.only or any(w.lower() in cls.name.lower() for w in args.only)

    def log(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    if args.engine in ("sim", "both"):
        for cls in filter(wanted, chaos.SCENARIOS):
            for _ in range(args.trials):
                rows.append(chaos.run_scenario(cls, profile, log=log))
    sglang = [cls for cls in chaos.SGLANG_SCENARIOS if wanted(cls) for _ in range(args.trials)]
    if args.engine in ("sglang", "both") and sglang:
        rows += chaos.run_sglang(sglang, profile, log=log)
    trial: dict = {}
    for row in rows:
        key = (row.fault, row.engine)
        trial[key] = trial.get(key, 0) + 1
        engine = " on SGLang's controller" if row.engine == "sglang" else ""
        broken += [f"{row.fault}{engine} (trial {trial[key]}): {p}" for p in row.problems()]
    print(chaos.markdown(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(chaos.to_json(rows), encoding="utf-8")
    for line in broken:
        print("BROKEN:", line)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
