"""After-attempt webhooks: the execution callback and failure/recovery actions.

* ``callback_url`` (the execution's, else the task's): POST ``execution.completed``
  after every finished attempt, signed like deliveries, up to 3 tries (waits 5 s, 20 s).
* ``on_failure_url`` / ``on_recovery_url``: fired on a state transition of the task,
  judged against its previous *run* (DECISIONS 15), not the previous attempt: the
  failure action fires when a run ends failed (no retry left) and the previous run was
  absent or successful; the recovery action when a run succeeds after a failed run.

These are best-effort and in memory (lost if the executor dies), as upstream's are;
they never delay recording the result.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

from runlater.core.clock import iso_seconds
from runlater.workers.httpclient import ClientError, HttpClient
from runlater.workers.signing import upstream_signature

log = logging.getLogger("runlater.notify")

CALLBACK_WAITS = (5.0, 20.0)
NOTIFY_UA = "Runlater/1.0"


def _ts(value: Any) -> str | None:
    return iso_seconds(value) if value is not None else None


class Notifier:
    def __init__(self, client: HttpClient, *, allow_private: bool = False, callback_timeout: float = 10.0,
                 action_timeout: float = 15.0, waits: tuple[float, ...] = CALLBACK_WAITS) -> None:
        self.client = client
        self.allow_private = allow_private
        self.callback_timeout = callback_timeout
        self.action_timeout = action_timeout
        self.waits = waits
        self._pending: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def after_attempt(self, row: Any, result: Any, final: bool) -> None:
        callback = row["callback_url"] or row["task_callback_url"]
        if callback:
            self._spawn(self._callback(callback, row, result), "callback")
        if not final:
            return
        previous = row["last_execution_status"]
        if result.status != "success" and previous in (None, "success") and row["on_failure_url"]:
            self._spawn(self._action(row["on_failure_url"], "task.failed", row, result), "on-failure")
        elif result.status == "success" and previous in ("failed", "timeout") and row["on_recovery_url"]:
            self._spawn(self._action(row["on_recovery_url"], "task.recovered", row, result), "on-recovery")

    async def _callback(self, url: str, row: Any, result: Any) -> None:
        payload = orjson.dumps({
            "event": "execution.completed",
            "task_id": str(row["task_id"]),
            "execution_id": str(row["id"]),
            "status": result.status,
            "status_code": result.status_code,
            "duration_ms": result.duration_ms,
            "response_body": result.response_body,
            "error_message": result.error_message,
            "attempt": row["attempt"],
            "scheduled_for": _ts(row["scheduled_for"]),
            "finished_at": _ts(result.finished_at),
        })
        headers = [
            ("content-type", "application/json"),
            ("user-agent", NOTIFY_UA),
            ("x-runlater-signature", upstream_signature(row["webhook_secret"], payload)),
            ("x-runlater-task-id", str(row["task_id"])),
            ("x-runlater-execution-id", str(row["id"])),
        ]
        for attempt in range(len(self.waits) + 1):
            try:
                resp = await self.client.request("POST", url, headers, payload, timeout=self.callback_timeout)
                if 200 <= resp.status < 300:
                    return
                reason = f"HTTP {resp.status}"
            except ClientError as exc:
                reason = exc.reason
            if attempt < len(self.waits):
                await asyncio.sleep(self.waits[attempt])
        log.info("callback to %s for execution %s failed: %s", url, row["id"], reason)

    async def _action(self, url: str, event: str, row: Any, result: Any) -> None:
        execution: dict[str, Any] = {
            "id": str(row["id"]),
            "status": result.status,
            "status_code": result.status_code,
        }
        if event == "task.failed":
            execution["error_message"] = result.error_message
        execution.update(scheduled_for=_ts(row["scheduled_for"]), finished_at=_ts(result.finished_at),
                         duration_ms=result.duration_ms)
        payload = orjson.dumps({
            "event": event,
            "task": {"id": str(row["task_id"]), "name": row["name"], "url": row["url"], "method": row["method"]},
            "execution": execution,
        })
        try:
            await self.client.request("POST", url, [("content-type", "application/json"), ("user-agent", NOTIFY_UA)],
                                      payload, timeout=self.action_timeout)
        except ClientError as exc:
            log.info("%s webhook to %s failed: %s", event, url, exc.reason)

    async def close(self) -> None:
        for task in list(self._pending):
            task.cancel()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
