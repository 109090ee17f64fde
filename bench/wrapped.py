"""SGLang's own storage backends under HA: Mooncake, 3FS and S3 (SeaweedFS) behind HAStorage on SGLang
0.5.23's real HiCacheController (TP = 2 over gloo, on CPU), their servers frozen, killed and restarted
empty, and SGLang started with the Mooncake master down (``hicache_ha.sim.wrapped_faults``).

Reports, per fault: freeze → every rank on the standby, the storage calls SGLang's threads made while the
server was frozen (p99 / max, and how many outlived deadline + 20 ms + measured lag), exceptions and wrong
pages that reached SGLang, the share of requests fully served meanwhile, and restart → the member healthy
again. The unprotected figures (the same backends called by SGLang directly) are in the README's backend
table: a frozen Mooncake master blocks each call 30 s, a frozen 3FS metadata server as long as it is
stopped, a frozen S3 server 200 s.

Usage: python bench/wrapped.py [--stress] [--freeze-scale 1.0] [--json out/wrapped.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from hicache_ha.sim import wrapped_faults  # noqa: E402
from hicache_ha.sim.chaos import Stress  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stress", action="store_true", help="stress-ng on every core meanwhile")
    ap.add_argument("--freeze-scale", type=float, default=1.0, help="multiply the freezes (40 s, 8 s, 8 s)")
    ap.add_argument("--json", default="out/wrapped.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with Stress() if args.stress else contextlib.nullcontext():
        run = wrapped_faults.run(freeze_scale=args.freeze_scale, log=lambda m: print(m, flush=True))
    rows = wrapped_faults.summary(run)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))
    load = "stress-ng on every core" if args.stress else "no extra load"
    print(f"\n{load}\n| backend | frozen s | → standby ms | calls while frozen | p99 / max ms | over bound | "
          "exceptions | wrong pages | requests fully served | restart → healthy s (server up → healthy) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind in wrapped_faults.FAULTS:
        r = rows[kind]
        print(f"| {kind} | {r['freeze_s']} | {r['to_standby_ms']} | {r['calls_while_frozen']} | {r['call_p99_ms']} / "
              f"{r['call_max_ms']} | {r['over_bound']} | {r['exceptions']} | {r['wrong_pages']} | "
              f"{r['full_hits_while_frozen']:.1%} | {r['restart_to_healthy_s']} ({r['up_to_healthy_s']}) |")
    late = rows[wrapped_faults.LATE]
    print(f"\nMooncake master down at start-up for {late['down_s']} s: {late['iterations_while_down']} requests "
          f"served meanwhile (misses), {late['dropped_pages']} pages dropped and counted, {late['exceptions']} "
          f"exceptions, {late['over_bound']} calls over bound; member healthy {late['up_to_healthy_s']} s after "
          "the master came up")


if __name__ == "__main__":
    main()
