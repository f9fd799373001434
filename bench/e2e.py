"""End to end: creates and deliveries together, and how late deliveries start.

    python -m bench.e2e --rates 500,1000 --duration 30s --out DIR [--executors 1] [--target-delay-ms 100]

is ``python -m bench.ladder --e2e ...``: the seed ladder with executors on, every task delivered
to the mock target, which answers after ``--target-delay-ms``. Per rate the report gives creates/s
and executions/s side by side, and lateness p50/p99 (``started_at − scheduled_for`` from the
executions table). This module also holds the SQL those figures come from, which
``bench.drain`` uses too.
"""

from __future__ import annotations

import sys
from typing import Any

from bench.report import RateResult

# Percentiles in SQL: the rows never leave PostgreSQL. Lateness in milliseconds.
_LATENESS = """
    SELECT count(*) AS n,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
           percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99,
           max(ms) AS max
    FROM (SELECT extract(epoch FROM started_at - scheduled_for) * 1000 AS ms
          FROM executions
          WHERE started_at >= to_timestamp($1) AND started_at < to_timestamp($2)) s
"""


def lateness(dsn: str, since: float, until: float) -> dict[str, Any]:
    """Count, p50, p99 and max lateness (ms) of executions started in [since, until) (epoch s)."""
    from bench.ladder import sql_fetch

    row = sql_fetch(dsn, _LATENESS, since, until)[0]
    return {k: (None if row[k] is None else float(row[k])) for k in ("n", "p50", "p99", "max")}


def finished_between(dsn: str, since: float, until: float) -> int:
    from bench.ladder import sql_value

    return int(sql_value(dsn, "SELECT count(*) FROM executions WHERE finished_at >= to_timestamp($1) "
                              "AND finished_at < to_timestamp($2)", since, until))


def due_backlog(dsn: str, at: float) -> int:
    """Executions due at ``at`` that had not been claimed by then (still pending now)."""
    from bench.ladder import sql_value

    return int(sql_value(dsn, "SELECT count(*) FROM executions WHERE status = 'pending' AND "
                              "scheduled_for <= to_timestamp($1)", at))


def fill_window(dsn: str, result: RateResult, t0: float, t1: float) -> None:
    """Executions/s, lateness and the backlog left, for one k6 run between t0 and t1."""
    result.executions_done = finished_between(dsn, t0, t1)
    late = lateness(dsn, t0, t1)
    result.lateness_p50_ms, result.lateness_p99_ms, result.lateness_max_ms = late["p50"], late["p99"], late["max"]
    result.backlog_at_end = due_backlog(dsn, t1)
    if result.backlog_at_end:
        result.e2e_notes.append(f"{result.backlog_at_end:,} executions were due but unclaimed when k6 stopped "
                                "(the executors fell behind)")
    failed = sum_failed(dsn, t0, t1)
    if failed:
        result.e2e_notes.append(f"{failed:,} executions finished with a status other than success: {failed_kinds(dsn, t0, t1)}")


def sum_failed(dsn: str, t0: float, t1: float) -> int:
    from bench.ladder import sql_value

    return int(sql_value(dsn, "SELECT count(*) FROM executions WHERE finished_at >= to_timestamp($1) AND "
                              "finished_at < to_timestamp($2) AND status <> 'success'", t0, t1))


def failed_kinds(dsn: str, t0: float, t1: float) -> str:
    from bench.ladder import sql_fetch

    rows = sql_fetch(dsn, "SELECT status, coalesce(left(error_message, 60), status_code::text, '') AS why, count(*) AS n "
                          "FROM executions WHERE finished_at >= to_timestamp($1) AND finished_at < to_timestamp($2) "
                          "AND status <> 'success' GROUP BY 1, 2 ORDER BY n DESC LIMIT 3", t0, t1)
    return "; ".join(f"{r['status']} {r['why']!r} × {r['n']:,}" for r in rows)


def main(argv: list[str] | None = None) -> int:
    from bench import ladder

    args = list(sys.argv[1:] if argv is None else argv)
    if "--e2e" not in args:
        args.append("--e2e")
    return ladder.main(args)


if __name__ == "__main__":
    sys.exit(main())
