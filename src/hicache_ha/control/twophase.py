"""The two-phase switch across ranks, correct under crashes.

Phase 1 (prepare): every rank builds and probes the target; any refusal or silence aborts everywhere and
nothing changes. Phase 2 (commit): every rank moves its active pointer to the new epoch. If one fails,
every rank that may have committed (it said so, or it did not answer) is restored to the previous epoch
and the answer names the ranks that confirmed the rollback and those that could not; ranks that refused
are aborted. The switch (or detach) is persisted as in flight before the first command, so a controller
that dies mid-way is resumed by its successor, which moves every rank to one fresh epoch.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..backends import registry
from ..backends.errors import ConfigError
from ..config import parse
from .state import InFlight, NotLeader

if TYPE_CHECKING:
    from .controller import Controller


@dataclass
class Outcome:
    """What a controller operation answers: an HTTP status and a JSON body."""

    status: int
    body: dict


def failures(replies: dict[int, Optional[dict]]) -> dict[int, Optional[dict]]:
    return {r: rep for r, rep in replies.items() if rep is None or not rep.get("ok")}


def describe(failed: dict[int, Optional[dict]]) -> list[dict]:
    return [{"rank": r, "status": (rep or {}).get("status", 504),
             "reason": (rep or {}).get("error", "no answer in time")} for r, rep in sorted(failed.items())]


def check_attach(spec: dict, roots: list[Path]) -> str:
    """Validate a backend section attached over the API; return its name, or raise ConfigError. Types come
    from the allow-list (built-ins and registered plugins, never ``module:Class``: that would import code
    chosen by the caller on every rank); files may only live under the configured roots."""
    type_name = spec.get("type") if isinstance(spec, dict) else None
    if not isinstance(type_name, str) or type_name not in registry.known_types():
        raise ConfigError(f"backend type {type_name!r} cannot be attached over the API; attachable types: "
                          f"{', '.join(registry.known_types())} (module:Class only in the config file)")
    member = parse({"backends": [spec]}, environ={}).backends[0]
    paths = [getattr(member, "path", None), (getattr(member, "extra_config", None) or {}).get("file_storage_path")]
    for path in (Path(p) for p in paths if p):
        resolved = path.resolve()
        if not any(resolved == r.resolve() or resolved.is_relative_to(r.resolve()) for r in roots):
            allowed = ", ".join(str(r) for r in roots) or "none configured (admin.attach_roots)"
            raise ConfigError(f"backend {member.name!r}: path {str(path)!r} is outside the attach roots: {allowed}")
    return member.name


class TwoPhase:
    """Switch and detach steps of one controller; the caller holds the controller's switch lock."""

    def __init__(self, controller: "Controller") -> None:
        self.c = controller

    def switch(self, name: str, spec: Optional[dict], force: bool, drain_timeout_s: float, reason: str) -> Outcome:
        c = self.c
        ranks, missing = c.alive(), c.missing()
        if missing and not force:
            return Outcome(503, {"error": "ranks missing; nothing changed (force to switch the ranks present)",
                                 "missing": missing})
        if not ranks:
            return Outcome(503, {"error": "no rank is connected; nothing changed", "missing": missing})
        desired = c.desired
        base_epoch, base_active = desired.epoch, desired.active
        token, epoch = uuid.uuid4().hex, base_epoch + 1
        desired.switch_in_flight = InFlight(token=token, kind="switch", target=name, base_epoch=base_epoch,
                                            base_active=base_active)
        c.save()
        c.event(None, name, base_active or "none", "preparing", reason)
        try:
            replies = c.call(ranks, "prepare", {"token": token, "backend": name, "spec": spec}, c.command_timeout_s)
            refused = failures(replies)
            if refused:
                c.call(ranks, "abort", {"token": token}, c.command_timeout_s)
                c.event(None, name, "preparing", "aborted", f"prepare refused on ranks {sorted(refused)}")
                return Outcome(503, {"error": "prepare refused; nothing changed", "failed": describe(refused),
                                     "epoch": base_epoch, "active": base_active})
            replies = c.call(ranks, "commit", {"token": token, "epoch": epoch, "force": force,
                                               "drain_timeout_s": drain_timeout_s, "reason": reason},
                             c.command_timeout_s + drain_timeout_s)
            failed = failures(replies)
            if failed:
                return self._rolled_back(ranks, replies, failed, token, base_epoch, base_active, name)
            desired.epoch, desired.active, desired.provisional = epoch, name, False  # an operator's state now
            if spec is not None:
                desired.specs[name] = spec
            c.event(None, name, base_active or "none", name, reason)
            return Outcome(200, {"epoch": epoch, "active": name, "ranks": ranks, "missing": missing})
        except NotLeader as exc:
            return Outcome(503, {"error": f"this controller lost its leadership mid-switch: {exc}"})
        finally:
            desired.switch_in_flight = None
            c.save_if_leader()

    def _rolled_back(self, ranks, replies, failed, token, base_epoch, base_active, name) -> Outcome:
        c = self.c
        # A rank that said it committed, or said nothing, may be on the new epoch: restore it. One that
        # refused did not move: abort its prepared switch.
        maybe = [r for r in ranks if replies.get(r) is None or replies[r].get("ok")]
        refused = sorted(r for r in failed if replies.get(r) is not None)
        restored, unconfirmed = self.restore(maybe, base_epoch, base_active)
        if refused:
            c.call(refused, "abort", {"token": token}, c.command_timeout_s)
        status = 409 if failed and all((f or {}).get("status") == 409 for f in failed.values()) else 503
        c.event(None, name, "committing", "rolled back",
                f"commit failed on ranks {sorted(failed)}; restored {restored}; unconfirmed {unconfirmed}")
        return Outcome(status, {"error": "commit failed; the ranks that may have moved were rolled back",
                                "failed": describe(failed), "rolled_back": restored,
                                "rollback_unconfirmed": unconfirmed, "epoch": base_epoch, "active": base_active})

    def restore(self, ranks: list[int], epoch: int, active: Optional[str]) -> tuple[list[int], list[int]]:
        """Put ``ranks`` back on (epoch, active); (ranks that confirmed, ranks that did not)."""
        if not ranks:
            return [], []
        replies = self.c.call(ranks, "restore", {"epoch": epoch, "active": active}, self.c.command_timeout_s)
        bad = failures(replies)
        return sorted(r for r in ranks if r not in bad), sorted(bad)

    def detach(self, force: bool, drain_timeout_s: float) -> Outcome:
        c = self.c
        ranks, missing = c.alive(), c.missing()
        if missing and not force:
            return Outcome(503, {"error": "ranks missing; nothing changed", "missing": missing})
        desired = c.desired
        base_epoch, base_active = desired.epoch, desired.active
        epoch = base_epoch + 1
        desired.switch_in_flight = InFlight(token=uuid.uuid4().hex, kind="detach", base_epoch=base_epoch,
                                            base_active=base_active)
        c.save()
        try:
            replies = c.call(ranks, "detach", {"epoch": epoch, "force": force, "drain_timeout_s": drain_timeout_s},
                             c.command_timeout_s + drain_timeout_s)
            failed = failures(replies)
            if failed:
                maybe = [r for r in ranks if replies.get(r) is None or replies[r].get("ok")]
                restored, unconfirmed = self.restore(maybe, base_epoch, base_active)
                status = 409 if all((f or {}).get("status") == 409 for f in failed.values()) else 503
                return Outcome(status, {"error": "detach failed; the ranks that may have detached were rolled back",
                                        "failed": describe(failed), "rolled_back": restored,
                                        "rollback_unconfirmed": unconfirmed})
            desired.epoch, desired.active, desired.provisional = epoch, None, False
            c.event(None, base_active, base_active or "none", "none", "detached by admin")
            return Outcome(200, {"epoch": epoch, "active": None, "ranks": ranks})
        except NotLeader as exc:
            return Outcome(503, {"error": f"this controller lost its leadership mid-detach: {exc}"})
        finally:
            desired.switch_in_flight = None
            c.save_if_leader()
