"""k6 summaries in, the seed's tables and a plot out.

``parse_k6_summary`` reads what ``k6 run --summary-export FILE`` writes (one object per metric,
trend statistics flattened, ``thresholds`` mapping each expression to *whether it failed*) and
also the richer ``handleSummary`` form (statistics under ``values``, thresholds as
``{"ok": bool}``), so a summary saved either way can be turned into a table row.

The table is the seed report's (``/work/shared/seed/load-testing-report.md``): rate, success %,
p50, p95, dropped iterations, tasks/s, with the achieved request rate and a note added. Latencies
are printed the way the seed prints them (``145ms``, ``2.28s``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class QueryStat:
    query: str
    calls: int
    total_ms: float
    mean_ms: float
    rows: int


@dataclass
class RateResult:
    """One rung of the ladder: what k6 saw, plus what the harness measured around it."""

    rate: int
    duration_s: float
    requests: int = 0
    achieved_rps: float = 0.0
    success_pct: float = 0.0  # share of requests that were not failed (k6's http_req_failed)
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    dropped: int = 0
    tasks_created: int = 0
    status_2xx: int = 0
    status_4xx: int = 0
    status_5xx: int = 0
    p50_503_ms: float | None = None
    p99_503_ms: float | None = None
    count_503: int = 0
    retry_after_503_pct: float | None = None
    p95_ok_ms: float | None = None
    vus_max: int = 0
    failed_thresholds: list[str] = field(default_factory=list)
    # Filled by the harness, not by k6:
    server_us: float | None = None  # CPU µs per request: HTTP workers (+ executors in e2e)
    db_us: float | None = None  # PostgreSQL processes
    k6_us: float | None = None
    executions_done: int | None = None  # e2e: executions finished during the run
    lateness_p50_ms: float | None = None
    lateness_p99_ms: float | None = None
    lateness_max_ms: float | None = None
    backlog_at_end: int | None = None  # e2e: executions due but not started when k6 stopped
    e2e_notes: list[str] = field(default_factory=list)
    load_avg: float | None = None  # 1-minute load average when the rate started
    top_queries: list[QueryStat] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def tasks_per_s(self) -> float:
        return self.tasks_created / self.duration_s if self.duration_s else 0.0

    @property
    def executions_per_s(self) -> float | None:
        if self.executions_done is None or not self.duration_s:
            return None
        return self.executions_done / self.duration_s

    @property
    def thresholds_ok(self) -> bool:
        return not self.failed_thresholds


def _stat(metric: dict[str, Any] | None, name: str, default: float = 0.0) -> float:
    """One statistic of a metric, in either summary form."""
    if not metric:
        return default
    values = metric.get("values", metric)
    value = values.get(name)
    return default if value is None else float(value)


def _failed_thresholds(metrics: dict[str, Any]) -> list[str]:
    failed = []
    for name, metric in sorted(metrics.items()):
        for expr, verdict in (metric.get("thresholds") or {}).items():
            # --summary-export: True means the threshold was crossed (k6's "lastFailed").
            # handleSummary: {"ok": false} means the same.
            crossed = (not verdict.get("ok", True)) if isinstance(verdict, dict) else bool(verdict)
            if crossed:
                failed.append(f"{name} {expr}")
    return failed


def parse_k6_summary(data: dict[str, Any] | str | Path, rate: int, duration_s: float) -> RateResult:
    """A ``RateResult`` from a k6 summary (a dict, JSON text, or a path to a JSON file)."""
    if isinstance(data, Path):
        data = json.loads(data.read_text())
    elif isinstance(data, str):
        data = json.loads(data)
    metrics: dict[str, Any] = data.get("metrics") or {}
    if "http_reqs" not in metrics:
        raise ValueError("not a k6 summary with HTTP requests (no http_reqs metric)")
    r = RateResult(rate=rate, duration_s=duration_s)
    reqs = metrics.get("http_reqs")
    r.requests = int(_stat(reqs, "count"))
    r.achieved_rps = r.requests / duration_s if duration_s else _stat(reqs, "rate")
    failed = metrics.get("http_req_failed")
    # Rate metric: "value" (or "rate" in handleSummary) is the share of failed requests.
    fail_share = _stat(failed, "value", _stat(failed, "rate", 0.0)) if failed else 0.0
    r.success_pct = 100.0 * (1.0 - fail_share) if r.requests else 0.0
    dur = metrics.get("http_req_duration")
    r.p50_ms = _stat(dur, "med")
    r.p95_ms = _stat(dur, "p(95)")
    r.p99_ms = _stat(dur, "p(99)")
    r.max_ms = _stat(dur, "max")
    r.dropped = int(_stat(metrics.get("dropped_iterations"), "count"))
    r.tasks_created = int(_stat(metrics.get("tasks_created"), "count"))
    r.status_2xx = int(_stat(metrics.get("status_2xx"), "count"))
    r.status_4xx = int(_stat(metrics.get("status_4xx"), "count"))
    r.status_5xx = int(_stat(metrics.get("status_5xx"), "count"))
    lat503 = metrics.get("latency_503")
    if lat503:
        r.p50_503_ms = _stat(lat503, "med")
        r.p99_503_ms = _stat(lat503, "p(99)")
        retry = metrics.get("retry_after_503")
        if retry:
            r.retry_after_503_pct = 100.0 * _stat(retry, "value", _stat(retry, "rate", 0.0))
            r.count_503 = int(_stat(retry, "passes") + _stat(retry, "fails"))
    ok = metrics.get("latency_ok")
    if ok:
        r.p95_ok_ms = _stat(ok, "p(95)")
    r.vus_max = int(_stat(metrics.get("vus_max"), "max", _stat(metrics.get("vus_max"), "value")))
    r.failed_thresholds = _failed_thresholds(metrics)
    return r


# --------------------------------------------------------------------------------------------
# Rendering


def fmt_latency(ms: float | None) -> str:
    """The seed's style: ``145ms`` below a second, ``2.28s`` above; sub-ms kept readable."""
    if ms is None:
        return "n/a"
    if ms >= 1000:
        return f"{ms / 1000:.2f}s"
    if ms >= 10:
        return f"{ms:.0f}ms"
    return f"{ms:.1f}ms"


def _note(r: RateResult) -> str:
    parts = []
    if r.failed_thresholds:
        parts.append("Threshold fail (" + ", ".join(t.replace("http_req_", "") for t in r.failed_thresholds) + ")")
    if r.success_pct < 100.0 and r.requests:
        parts.append(f"{100 - r.success_pct:.1f}% errors")
    if r.dropped and r.requests:
        parts.append(f"{100 * r.dropped / (r.dropped + r.requests):.1f}% dropped")
    parts += r.notes
    return "; ".join(parts) if parts else "Clean"


def _pct(v: float) -> str:
    return "100%" if v >= 99.9995 else f"{v:.2f}%"


def seed_table(results: list[RateResult]) -> str:
    """The seed's table: one row per offered rate."""
    lines = ["| Rate | Success | p50 | p95 | p99 | Dropped | Tasks/s | Achieved req/s | Notes |",
             "|------|---------|-----|-----|-----|---------|---------|----------------|-------|"]
    for r in results:
        lines.append(f"| {r.rate}/s | {_pct(r.success_pct)} | {fmt_latency(r.p50_ms)} | {fmt_latency(r.p95_ms)} | "
                     f"{fmt_latency(r.p99_ms)} | {r.dropped:,} | {r.tasks_per_s:,.0f}/s | {r.achieved_rps:,.0f}/s | "
                     f"{_note(r)} |")
    return "\n".join(lines)


def e2e_table(results: list[RateResult]) -> str:
    lines = ["| Rate | Creates/s (202) | Executions/s | Lateness p50 | Lateness p99 | Lateness max |",
             "|------|-----------------|--------------|--------------|--------------|--------------|"]
    for r in results:
        eps = r.executions_per_s
        lines.append(f"| {r.rate}/s | {r.tasks_per_s:,.0f} | {'n/a' if eps is None else f'{eps:,.0f}'} | "
                     f"{fmt_latency(r.lateness_p50_ms)} | {fmt_latency(r.lateness_p99_ms)} | "
                     f"{fmt_latency(r.lateness_max_ms)} |")
    return "\n".join(lines)


def cpu_table(results: list[RateResult], server_label: str = "server") -> str:
    def us(v: float | None) -> str:
        return "n/a" if v is None else f"{v:,.0f}"

    lines = [f"| Rate | {server_label} µs/req | PostgreSQL µs/req | k6 µs/req | total µs/req |",
             "|------|---:|---:|---:|---:|"]
    for r in results:
        parts = [v for v in (r.server_us, r.db_us, r.k6_us) if v is not None]
        lines.append(f"| {r.rate}/s | {us(r.server_us)} | {us(r.db_us)} | {us(r.k6_us)} | "
                     f"{us(sum(parts)) if parts else 'n/a'} |")
    return "\n".join(lines)


def queries_table(stats: list[QueryStat]) -> str:
    if not stats:
        return "(no statements recorded)"
    lines = ["| total ms | calls | mean ms | rows | query |", "|---:|---:|---:|---:|---|"]
    for q in stats:
        text = q.query.replace("|", "\\|")
        lines.append(f"| {q.total_ms:,.0f} | {q.calls:,} | {q.mean_ms:.3f} | {q.rows:,} | `{text}` |")
    return "\n".join(lines)


def plot(results: list[RateResult], path: Path, title: str = "runlater seed mix (k6)") -> str | None:
    """p50/p95 latency and achieved throughput against offered rate, as a PNG.

    Returns None when written, else the reason it was not (matplotlib missing: it is in the
    optional ``bench`` extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'runlater[bench]'); ladder.png skipped"
    if not results:
        return "no results to plot"
    rates = [r.rate for r in results]
    fig, (ax_lat, ax_tp) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_lat.plot(rates, [r.p50_ms for r in results], "o-", label="p50")
    ax_lat.plot(rates, [r.p95_ms for r in results], "s-", label="p95")
    ax_lat.set_xlabel("offered rate (req/s)")
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_yscale("log")
    ax_lat.grid(True, which="both", alpha=0.3)
    ax_lat.legend()
    ax_lat.set_title("latency")
    ax_tp.plot(rates, rates, ":", color="grey", label="offered")
    ax_tp.plot(rates, [r.achieved_rps for r in results], "o-", label="achieved req/s")
    ax_tp.plot(rates, [r.tasks_per_s for r in results], "^-", label="tasks/s (202)")
    if any(r.executions_per_s is not None for r in results):
        ax_tp.plot(rates, [r.executions_per_s or 0 for r in results], "d-", label="executions/s")
    ax_tp.set_xlabel("offered rate (req/s)")
    ax_tp.set_ylabel("per second")
    ax_tp.grid(True, alpha=0.3)
    ax_tp.legend()
    ax_tp.set_title("throughput")
    for r in results:
        if not r.thresholds_ok:
            ax_lat.annotate("fail", (r.rate, r.p95_ms), textcoords="offset points", xytext=(0, 6),
                            ha="center", color="red", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
