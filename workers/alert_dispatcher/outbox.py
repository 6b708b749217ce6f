"""Delivery of the alert outbox, one runner per channel.

A runner reads the pending rows of its channel that are due, delivers them one
at a time, and reports each outcome to the DB writer: `alert_delivered`, or
`alert_failed` with the time of the next attempt (doubling from
`retry_base_delay` up to `retry_max_delay`), or with none once the alert's
`delivery_deadline` passed. Delivery is at least once: an alert delivered
while its outcome cannot be stored is delivered again later.

Each channel has its own runner, so a dead webhook receiver never delays the
log or email channels, and a runner's failures never reach the acceptors.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import apsw
import trio

from deeperhub.errors import StorageError
from deeperhub.ipc import RemoteError
from deeperhub.metrics import (
    SECURITY_ALERT_DELIVERY_FAILURES,
    SECURITY_ALERTS_DELIVERED,
)
from deeperhub.security.alerts import retry_delay
from deeperhub.security.links import LinkDown
from deeperhub.storage.security_reads import due_deliveries, next_delivery_time

from .channels import DeliveryError

if TYPE_CHECKING:
    from collections.abc import Callable

    from deeperhub.security.config import AlertConfig
    from deeperhub.security.links import Link
    from deeperhub.storage.reads import ReadPool

    from .channels import Channel

__all__ = ["OutboxRunner"]

log = logging.getLogger("deeperhub.alert_dispatcher")

# Rows read per query.
BATCH = 50
# Seconds between two scans when nothing wakes the runner up.
POLL_INTERVAL = 5.0
# Seconds one outcome may take to be stored by the DB writer.
MARK_TIMEOUT = 10.0
# Seconds to wait after the database or the DB writer failed.
ERROR_DELAY = 1.0
# Extra seconds a delivery may take beyond the channel's own timeout.
DELIVERY_TIMEOUT_MARGIN = 5.0


class OutboxRunner:
    """Delivers the due outbox rows of one channel until cancelled."""

    def __init__(
        self,
        channel: Channel,
        config: AlertConfig,
        *,
        reads: ReadPool,
        db: Link,
        delivery_timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.channel = channel
        self.config = config
        self.reads = reads
        self.db = db
        self.delivery_timeout = delivery_timeout + DELIVERY_TIMEOUT_MARGIN
        self.clock = clock
        self._wake = trio.Event()
        self.delivered = 0
        self.failed_attempts = 0

    def wake(self) -> None:
        """Make the runner scan its outbox now."""
        self._wake.set()

    async def run(self) -> None:
        """Scan, deliver and wait, forever."""
        name = self.channel.name
        while True:
            self._wake = trio.Event()
            try:
                rows = await self.reads.run(due_deliveries, name, self.clock(), BATCH)
            except (apsw.Error, StorageError, trio.ClosedResourceError) as exc:
                log.error("cannot read the %s alert outbox: %s", name, exc)
                await trio.sleep(ERROR_DELAY)
                continue

            for row in rows:
                if not await self._deliver(row):
                    await trio.sleep(ERROR_DELAY)
                    break
            if len(rows) == BATCH:
                continue
            await self._wait_for_work()

    async def _wait_for_work(self) -> None:
        wait = POLL_INTERVAL
        try:
            due = await self.reads.run(next_delivery_time, self.channel.name)
        except (apsw.Error, StorageError, trio.ClosedResourceError):
            due = None
        if due is not None:
            wait = min(POLL_INTERVAL, max(0.0, due - self.clock()))
        with trio.move_on_after(wait):
            await self._wake.wait()

    async def _deliver(self, row: dict[str, Any]) -> bool:
        """Deliver one row and store the outcome. False if it could not be stored."""
        event = row["event"]
        attempt = int(row["attempts"]) + 1
        name = self.channel.name
        if self.clock() > float(row["deadline"]):
            return await self._give_up(
                row, "delivery deadline passed before an attempt"
            )

        try:
            with trio.fail_after(self.delivery_timeout):
                await self.channel.deliver(event, attempt)
        except (DeliveryError, trio.TooSlowError) as exc:
            reason = str(exc) or f"timed out after {self.delivery_timeout:g} s"
            return await self._failed(row, attempt, reason)

        self.delivered += 1
        SECURITY_ALERTS_DELIVERED.labels(
            severity=str(event["severity"]), channel=name
        ).inc()
        if attempt > 1:
            log.info(
                "delivered alert %s to %s on attempt %d", event["id"], name, attempt
            )
        return await self._mark("alert_delivered", outbox_id=row["outbox_id"])

    async def _failed(self, row: dict[str, Any], attempt: int, reason: str) -> bool:
        name = self.channel.name
        self.failed_attempts += 1
        delay = retry_delay(
            attempt, self.config.retry_base_delay, self.config.retry_max_delay
        )
        next_attempt_at = self.clock() + delay
        if next_attempt_at > float(row["deadline"]):
            return await self._give_up(row, reason)
        SECURITY_ALERT_DELIVERY_FAILURES.labels(channel=name, outcome="retry").inc()
        log.warning(
            "delivery of alert %s to %s failed (attempt %d): %s; retrying in %.1f s",
            row["event"]["id"],
            name,
            attempt,
            reason,
            delay,
        )
        return await self._mark(
            "alert_failed",
            outbox_id=row["outbox_id"],
            error=reason,
            next_attempt_at=next_attempt_at,
        )

    async def _give_up(self, row: dict[str, Any], reason: str) -> bool:
        name = self.channel.name
        SECURITY_ALERT_DELIVERY_FAILURES.labels(channel=name, outcome="gave_up").inc()
        log.error(
            "giving up delivery of alert %s to %s after %d attempts: %s",
            row["event"]["id"],
            name,
            row["attempts"],
            reason,
        )
        return await self._mark(
            "alert_failed",
            outbox_id=row["outbox_id"],
            error=reason,
            next_attempt_at=None,
        )

    async def _mark(self, op: str, **args: Any) -> bool:
        try:
            await self.db.call(op, timeout=MARK_TIMEOUT, now=self.clock(), **args)
        except RemoteError as exc:
            log.error(
                "DB writer rejected %s for outbox row %s: %s",
                op,
                args.get("outbox_id"),
                exc,
            )
        except (LinkDown, trio.TooSlowError) as exc:
            log.warning(
                "cannot store %s for outbox row %s: %s; the alert may be delivered "
                "again",
                op,
                args.get("outbox_id"),
                exc or "timed out",
            )
            return False
        return True
