"""What the controller knows of each rank: its identity (checked against the deployment's shape), its last
status, when it was last heard, and what it has seen of controllers (the newest fencing token and epoch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

IDENTITY = ("tp", "pp", "dp", "cp", "tp_size", "pp_size", "dp_size", "cp_size")


@dataclass
class RankInfo:
    rank: int
    identity: dict
    status: dict
    last_seen: float
    converge_after: float = 0.0
    fence_seen: int = 0  # the newest fencing token the rank has seen, and the controllers that used it
    fence_by: tuple = ()
    epoch_seen: int = 0  # the newest epoch a controller moved it to

    def saw(self, seen) -> None:
        """What the rank says it has seen (every message carries it, in the order it changed)."""
        if not isinstance(seen, dict):
            return
        fence, by, epoch = seen.get("fence"), seen.get("by"), seen.get("epoch")
        if isinstance(fence, int) and not isinstance(fence, bool) and fence >= 0:
            self.fence_seen = fence
            self.fence_by = tuple(b for b in by if isinstance(b, str))[:8] if isinstance(by, list) else ()
        if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0:
            self.epoch_seen = epoch

    def ahead_of(self, fence: int, owner: str) -> bool:
        """The rank saw a newer token than ``fence``, or ``fence`` itself used by another controller."""
        return self.fence_seen > fence or (self.fence_seen == fence and any(b != owner for b in self.fence_by))

    def update_status(self, status: Optional[dict]) -> None:
        """Keep the newest status the rank sent (heartbeats and replies may cross: ``seq`` orders them)."""
        if isinstance(status, dict) and isinstance(status.get("seq"), int) and status["seq"] >= self.status.get("seq", 0):
            self.status = status


def rank_problem(rank, identity, expected: int) -> Optional[str]:
    """Why an agent's claimed identity does not fit the deployment (None: it fits)."""
    if not isinstance(rank, int) or not isinstance(identity, dict):
        return "no rank or identity"
    if not all(isinstance(identity.get(k), int) for k in IDENTITY):
        return f"identity lacks {', '.join(k for k in IDENTITY if not isinstance(identity.get(k), int))}"
    i = identity
    if any(not 0 <= i[k] < i[f"{k}_size"] for k in ("tp", "pp", "dp", "cp")):
        return f"identity {i} has an index outside its size"
    if i["tp_size"] * i["pp_size"] * i["dp_size"] * i["cp_size"] != expected:
        return f"identity {i} describes {i['tp_size'] * i['pp_size'] * i['dp_size'] * i['cp_size']} ranks, " \
               f"this deployment has {expected}"
    if rank != i["tp"] + i["tp_size"] * (i["cp"] + i["cp_size"] * (i["pp"] + i["pp_size"] * i["dp"])):
        return f"rank {rank} does not match identity {i}"
    return None
