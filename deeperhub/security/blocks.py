"""IP blocks and their escalation for repeat offenders.

Each IP has at most one block record: the current block, or the last one
after it expired, kept so the next block can escalate. The n-th offence is
blocked for `block_duration * block_multiplier ** (n - 1)` seconds, at most
`max_block_duration`. An offence more than `offence_reset` seconds after the
previous block ended counts as a first offence again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["ANOMALY", "MANUAL", "Block", "BlockList", "Escalation"]

ANOMALY = "anomaly"
MANUAL = "manual"


@dataclass(frozen=True)
class Block:
    """One block of an IP. Times are Unix seconds, and `expires_at` None is forever."""

    ip: str
    reason: str  # the alert type that caused it, or "manual"
    source: str  # ANOMALY or MANUAL
    created_at: float
    expires_at: float | None
    offences: int

    def is_active(self, now: float) -> bool:
        return self.expires_at is None or self.expires_at > now

    def remaining(self, now: float) -> float | None:
        """Seconds left, 0 when expired, None when indefinite."""
        if self.expires_at is None:
            return None
        return max(0.0, self.expires_at - now)


@dataclass(frozen=True)
class Escalation:
    """Block durations in seconds for the first and repeated offences."""

    base: float
    multiplier: float
    maximum: float
    reset_after: float

    def offences_after(self, previous: Block | None, now: float) -> int:
        """Return the offence number of a new block, given the IP's last block."""
        if previous is None:
            return 1
        ended = previous.expires_at if previous.expires_at is not None else now
        if now - min(ended, now) > self.reset_after:
            return 1
        return previous.offences + 1

    def duration(self, offences: int) -> float:
        """Return the block duration of the `offences`-th offence."""
        exponent = max(0, offences - 1)
        # Capping the exponent keeps the float finite for absurd offence counts.
        return min(self.maximum, self.base * self.multiplier ** min(exponent, 64))


class BlockList:
    """The last block record of each IP."""

    def __init__(self) -> None:
        self._records: dict[str, Block] = {}

    def __len__(self) -> int:
        return len(self._records)

    def record(self, ip: str) -> Block | None:
        """Return the last block of `ip`, active or not."""
        return self._records.get(ip)

    def active(self, ip: str, now: float) -> Block | None:
        """Return the block of `ip` if it is active at `now`."""
        block = self._records.get(ip)
        return block if block is not None and block.is_active(now) else None

    def put(self, block: Block) -> None:
        self._records[block.ip] = block

    def remove(self, ip: str) -> Block | None:
        """Forget `ip` entirely, offences included."""
        return self._records.pop(ip, None)

    def end(self, ip: str, now: float) -> Block | None:
        """Make an active block of `ip` expire at `now`, keeping its offences."""
        block = self.active(ip, now)
        if block is None:
            return None
        ended = replace(block, expires_at=now)
        self._records[ip] = ended
        return ended

    def active_blocks(self, now: float) -> list[Block]:
        return [block for block in self._records.values() if block.is_active(now)]

    def forget_old(self, now: float, reset_after: float) -> list[str]:
        """Forget expired blocks that can no longer escalate, and return their IPs."""
        old = [
            ip
            for ip, block in self._records.items()
            if block.expires_at is not None and block.expires_at < now - reset_after
        ]
        for ip in old:
            del self._records[ip]
        return old
