"""The offline budget of a chain: how much may wait for the cloud before signing is refused.

Pure arithmetic (DESIGN.md §3.6, docs/sync.md): given the limits and what is waiting — the
number of records not yet accepted by a real-time uplink and the age of the oldest of them —
say the level (``ok`` / ``warning`` / ``hard``), what remains, and whether a new record must
be refused. No clock (the caller passes ages), no IO.

Two ceilings exist. The configured ones (``max_records``, ``max_age_s``) follow the policy:
``warn`` only reports the hard level, ``block`` refuses new records once it is reached. The
protocol ceiling :data:`PROTOCOL_MAX_PENDING` is not a preference: ``X-Replay-Remaining``
has four digits, so a chain never holds more than 9,999 unsent records, whatever the policy.
"""

from __future__ import annotations

from dataclasses import dataclass

#: ``X-Replay-Remaining`` is ``^\d{1,4}$``: at most 9,999 records may wait per chain.
PROTOCOL_MAX_PENDING = 9999

POLICIES = ("warn", "block")
LEVELS = ("ok", "warning", "hard")


@dataclass(frozen=True, slots=True)
class BudgetLimits:
    max_records: int = PROTOCOL_MAX_PENDING
    warn_records: int = 5000
    max_age_s: float = 172800.0
    warn_age_s: float = 86400.0
    policy: str = "warn"

    def __post_init__(self) -> None:
        if not 1 <= self.max_records <= PROTOCOL_MAX_PENDING:
            raise ValueError(f"max_records must be 1-{PROTOCOL_MAX_PENDING}")
        if not 0 < self.warn_records <= self.max_records:
            raise ValueError("warn_records must be 1-max_records")
        if not 0 < self.warn_age_s <= self.max_age_s:
            raise ValueError("warn_age_s must be > 0 and <= max_age_s")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}")


@dataclass(frozen=True, slots=True)
class Budget:
    """The budget of one chain right now."""

    level: str
    pending_records: int
    remaining_records: int
    oldest_age_s: float | None
    remaining_s: float
    policy: str
    #: why the next record would be refused (None: it would be signed)
    refusal: str | None

    def to_json(self) -> dict[str, object]:
        return {
            "level": self.level,
            "policy": self.policy,
            "pending_records": self.pending_records,
            "remaining_records": self.remaining_records,
            "oldest_unsent_age_s": (
                None if self.oldest_age_s is None else round(self.oldest_age_s, 3)
            ),
            "remaining_s": round(self.remaining_s, 3),
            "blocked": self.refusal is not None,
        }


def assess(limits: BudgetLimits, pending: int, oldest_age_s: float | None) -> Budget:
    """The budget with ``pending`` records waiting, the oldest ``oldest_age_s`` old."""
    pending = max(0, pending)
    age = None if pending == 0 or oldest_age_s is None else max(0.0, oldest_age_s)
    age_v = age or 0.0
    if pending >= limits.max_records or age_v >= limits.max_age_s:
        level = "hard"
    elif pending >= limits.warn_records or age_v >= limits.warn_age_s:
        level = "warning"
    else:
        level = "ok"
    refusal = None
    if pending >= PROTOCOL_MAX_PENDING:
        refusal = (
            f"{pending} records are waiting for the cloud: the replay counter "
            f"(X-Replay-Remaining, 4 digits) cannot announce more than {PROTOCOL_MAX_PENDING}"
        )
    elif limits.policy == "block" and pending >= limits.max_records:
        refusal = (
            f"{pending} records are waiting for the cloud (sync.max_pending_records = "
            f"{limits.max_records}, offline_policy = block)"
        )
    elif limits.policy == "block" and age_v >= limits.max_age_s:
        refusal = (
            f"the oldest unsent record is {age_v:.0f} s old (sync.max_offline_age_s = "
            f"{limits.max_age_s:.0f}, offline_policy = block)"
        )
    return Budget(
        level=level,
        pending_records=pending,
        remaining_records=max(0, limits.max_records - pending),
        oldest_age_s=age,
        remaining_s=max(0.0, limits.max_age_s - age_v),
        policy=limits.policy,
        refusal=refusal,
    )


def worst(levels: list[str]) -> str:
    """The most severe of several levels (``ok`` for none)."""
    return max(levels, key=LEVELS.index, default="ok")
