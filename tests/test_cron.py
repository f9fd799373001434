"""Cron expressions (runlater.core.cron) and the cron create's validation
(validation.parse_cron_create): dialect, next runs across DST and month ends, upstream's
interval heuristic and the tier minimum. No database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from runlater.core import cron
from runlater.http import errors as E
from runlater.http import validation as V


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def nexts(expression: str, start: datetime, n: int, timezone: str | None = None) -> list[str]:
    """The next ``n`` fire times after ``start``, as ``YYYY-MM-DDTHH:MMZ``."""
    schedule = cron.parse(expression, timezone)
    out = []
    t = start
    for _ in range(n):
        t = schedule.next_after(t)
        out.append(t.strftime("%Y-%m-%dT%H:%MZ"))
    return out


# --------------------------------------------------------------------------------------
# Dialect
# --------------------------------------------------------------------------------------


class TestParse:
    @pytest.mark.parametrize(
        "expression",
        [
            "* * * * *", "*/5 * * * *", "0,30 * * * *", "0-59/15 9-17 * * MON-FRI", "5/10 * * * *",
            "0 9 1,15 * *", "0 0 L * *", "0 0 * * 5L", "0 0 * * 1#2", "0 0 LW * *",
            "0 0 1 jan *", "0 0 * * sun", "0 0 * Jan-Mar Mon-fri", "0 0 * * 0", "0 0 * * 7",
            "  0   9 * * *  ",
        ],
    )
    def test_valid(self, expression):
        assert cron.parse(expression).expression == expression

    @pytest.mark.parametrize(
        "expression, fields",
        [
            ("@yearly", "0 0 1 1 *"), ("@annually", "0 0 1 1 *"), ("@monthly", "0 0 1 * *"),
            ("@weekly", "0 0 * * 0"), ("@daily", "0 0 * * *"), ("@midnight", "0 0 * * *"),
            ("@hourly", "0 * * * *"), ("@minutely", "* * * * *"), ("@HOURLY", "0 * * * *"),
            ("@Daily", "0 0 * * *"),
        ],
    )
    def test_aliases_map_to_five_fields(self, expression, fields):
        assert cron.parse(expression).fields == fields

    @pytest.mark.parametrize("expression, fields", [("0 9", "0 9 * * *"), ("30", "30 * * * *"), ("0 0 1 6", "0 0 1 6 *")])
    def test_short_forms_are_padded_like_upstream(self, expression, fields):
        assert cron.parse(expression).fields == fields

    @pytest.mark.parametrize(
        "expression",
        [
            "", " ", "@reboot", "@REBOOT", "@secondly", "@every5m", "@",
            "* * * * * *", "0 0 9 * * *", "* * * * * * *",  # 6 and 7 fields
            "60 * * * *", "0 24 * * *", "0 0 0 * *", "0 0 32 * *", "0 0 * 13 *", "0 0 * * 8",
            "*/0 * * * *", "1- * * * *", "1-2-3 * * * *", "5-1 * * * *", "FRI-MON * * * *",
            "0 0 * * FRI-MON", "a b c d e", "? * * * *", "0 0 30 2 *", "0 0 31 4,6 *",
            "* * * * 1#6", "0 0 15W * *", "\u0663 * * * *", "*/x * * * *", "0 0 * foo *",
            "1" + ",1" * 200,  # longer than any stored expression may be
        ],
    )
    def test_invalid(self, expression):
        with pytest.raises(cron.CronError) as info:
            cron.parse(expression)
        assert info.value.message == "is not a valid cron expression"
        assert info.value.field == "cron_expression"

    @pytest.mark.parametrize("timezone", ["Mars/Olympus", "", "../etc/passwd", "/etc/localtime", "Europe/", "UTC\x00"])
    def test_invalid_timezone(self, timezone):
        with pytest.raises(cron.CronError) as info:
            cron.parse("* * * * *", timezone)
        assert (info.value.message, info.value.field) == ("is not a valid timezone", "timezone")

    def test_parse_is_cached(self):
        assert cron.parse("0 * * * *", "Europe/Berlin") is cron.parse("0 * * * *", "Europe/Berlin")


# --------------------------------------------------------------------------------------
# Next runs
# --------------------------------------------------------------------------------------


class TestNextAfter:
    def test_strictly_after_whole_minutes(self):
        s = cron.parse("* * * * *")
        assert s.next_after(utc(2026, 3, 1, 12, 0, 0)) == utc(2026, 3, 1, 12, 1)
        at = datetime(2026, 3, 1, 12, 0, 59, 999999, tzinfo=UTC)
        assert s.next_after(at) == utc(2026, 3, 1, 12, 1)
        assert s.next_after(utc(2026, 3, 1, 12, 0, 1)).second == 0

    def test_input_in_another_offset_means_the_same_instant(self):
        from zoneinfo import ZoneInfo

        local = utc(2026, 3, 1, 12, 0, 30).astimezone(ZoneInfo("Asia/Tokyo"))
        assert cron.parse("* * * * *").next_after(local) == utc(2026, 3, 1, 12, 1)

    def test_naive_datetimes_are_refused(self):
        with pytest.raises(ValueError):
            cron.parse("* * * * *").next_after(datetime(2026, 3, 1))

    def test_steps_ranges_lists(self):
        assert nexts("*/15 * * * *", utc(2026, 3, 1, 12, 7), 3) == [
            "2026-03-01T12:15Z", "2026-03-01T12:30Z", "2026-03-01T12:45Z"]
        assert nexts("5/20 * * * *", utc(2026, 3, 1, 12, 7), 3) == [
            "2026-03-01T12:25Z", "2026-03-01T12:45Z", "2026-03-01T13:05Z"]
        assert nexts("0 9-17/4 * * *", utc(2026, 3, 1, 12, 7), 3) == [
            "2026-03-01T13:00Z", "2026-03-01T17:00Z", "2026-03-02T09:00Z"]
        assert nexts("0,20 8,20 * * *", utc(2026, 3, 1, 12, 7), 3) == [
            "2026-03-01T20:00Z", "2026-03-01T20:20Z", "2026-03-02T08:00Z"]

    def test_names_and_sunday_as_0_or_7(self):
        start = utc(2026, 3, 2, 0, 0)  # a Monday
        assert nexts("0 6 * * SUN", start, 1) == nexts("0 6 * * 0", start, 1) == nexts("0 6 * * 7", start, 1) == [
            "2026-03-08T06:00Z"]
        assert nexts("0 6 1 feb-apr *", start, 2) == ["2026-04-01T06:00Z", "2027-02-01T06:00Z"]
        assert nexts("0 6 * * mon-fri", utc(2026, 3, 6, 7, 0), 2) == ["2026-03-09T06:00Z", "2026-03-10T06:00Z"]

    def test_day_31_skips_short_months(self):
        assert nexts("0 0 31 * *", utc(2026, 1, 31, 12), 3) == [
            "2026-03-31T00:00Z", "2026-05-31T00:00Z", "2026-07-31T00:00Z"]

    def test_feb_29_only_in_leap_years(self):
        assert nexts("0 12 29 2 *", utc(2026, 3, 1), 2) == ["2028-02-29T12:00Z", "2032-02-29T12:00Z"]

    def test_last_day_of_month(self):
        assert nexts("0 0 L * *", utc(2028, 1, 31, 1), 3) == [
            "2028-02-29T00:00Z", "2028-03-31T00:00Z", "2028-04-30T00:00Z"]

    def test_day_of_month_or_day_of_week_like_cron(self):
        # Both restricted: either matches (cron), not both (upstream's parser).
        assert nexts("0 0 13 * 5", utc(2026, 3, 1), 3) == [
            "2026-03-06T00:00Z", "2026-03-13T00:00Z", "2026-03-20T00:00Z"]

    def test_aliases(self):
        start = utc(2026, 3, 4, 10, 30)  # a Wednesday
        assert nexts("@hourly", start, 1) == ["2026-03-04T11:00Z"]
        assert nexts("@daily", start, 1) == nexts("@midnight", start, 1) == ["2026-03-05T00:00Z"]
        assert nexts("@weekly", start, 1) == ["2026-03-08T00:00Z"]
        assert nexts("@monthly", start, 1) == ["2026-04-01T00:00Z"]
        assert nexts("@yearly", start, 1) == nexts("@annually", start, 1) == ["2027-01-01T00:00Z"]
        assert nexts("@minutely", start, 1) == ["2026-03-04T10:31Z"]

    def test_fire_times_window(self):
        s = cron.parse("*/10 * * * *")
        got = list(s.fire_times(utc(2026, 3, 1, 12, 0), until=utc(2026, 3, 1, 12, 40)))
        assert got == [utc(2026, 3, 1, 12, m) for m in (10, 20, 30, 40)]
        assert list(s.fire_times(utc(2026, 3, 1, 12, 0), until=utc(2026, 3, 1, 13), limit=2)) == got[:2]
        assert list(s.fire_times(utc(2026, 3, 1, 12, 0), until=utc(2026, 3, 1, 12, 9))) == []


class TestDaylightSaving:
    """Europe/Berlin: 2026-03-29 02:00 CET → 03:00 CEST; 2026-10-25 03:00 CEST → 02:00 CET.
    America/New_York: 2026-03-08 02:00 EST → 03:00 EDT; 2026-11-01 02:00 EDT → 01:00 EST."""

    def test_utc_has_no_dst(self):
        assert nexts("30 2 * * *", utc(2026, 3, 28, 12), 2) == ["2026-03-29T02:30Z", "2026-03-30T02:30Z"]

    def test_berlin_fixed_time_in_the_missing_hour_runs_when_it_ends(self):
        assert nexts("30 2 * * *", utc(2026, 3, 27, 12), 4, "Europe/Berlin") == [
            "2026-03-28T01:30Z",  # 02:30 CET
            "2026-03-29T01:00Z",  # 02:30 does not exist: 03:00 CEST, the first minute after the gap
            "2026-03-30T00:30Z",  # 02:30 CEST
            "2026-03-31T00:30Z",
        ]

    def test_berlin_fixed_time_in_the_repeated_hour_runs_once(self):
        assert nexts("30 2 * * *", utc(2026, 10, 23, 12), 4, "Europe/Berlin") == [
            "2026-10-24T00:30Z",  # 02:30 CEST
            "2026-10-25T00:30Z",  # first 02:30 (CEST); the second one (CET) does not run
            "2026-10-26T01:30Z",  # 02:30 CET
            "2026-10-27T01:30Z",
        ]

    def test_berlin_hourly_follows_real_time(self):
        assert nexts("0 * * * *", utc(2026, 3, 28, 23, 30), 3, "Europe/Berlin") == [
            "2026-03-29T00:00Z", "2026-03-29T01:00Z", "2026-03-29T02:00Z"]  # 01:00 CET, 03:00, 04:00 CEST
        assert nexts("0 * * * *", utc(2026, 10, 24, 23, 30), 3, "Europe/Berlin") == [
            "2026-10-25T00:00Z", "2026-10-25T01:00Z", "2026-10-25T02:00Z"]  # 02:00 CEST, 02:00 CET, 03:00 CET

    def test_berlin_every_30_minutes_runs_the_repeated_hour_twice(self):
        assert nexts("*/30 * * * *", utc(2026, 10, 24, 23, 50), 6, "Europe/Berlin") == [
            "2026-10-25T00:00Z", "2026-10-25T00:30Z", "2026-10-25T01:00Z", "2026-10-25T01:30Z",
            "2026-10-25T02:00Z", "2026-10-25T02:30Z"]

    def test_berlin_daily_keeps_local_wall_time_across_the_change(self):
        assert nexts("0 9 * * *", utc(2026, 3, 27, 12), 3, "Europe/Berlin") == [
            "2026-03-28T08:00Z", "2026-03-29T07:00Z", "2026-03-30T07:00Z"]

    def test_new_york_spring_forward(self):
        assert nexts("30 2 * * *", utc(2026, 3, 6, 12), 3, "America/New_York") == [
            "2026-03-07T07:30Z", "2026-03-08T07:00Z", "2026-03-09T06:30Z"]
        assert nexts("*/30 * * * *", utc(2026, 3, 8, 6, 15), 3, "America/New_York") == [
            "2026-03-08T06:30Z", "2026-03-08T07:00Z", "2026-03-08T07:30Z"]  # 01:30 EST, 03:00, 03:30 EDT

    def test_new_york_fall_back(self):
        assert nexts("30 1 * * *", utc(2026, 10, 30, 12), 3, "America/New_York") == [
            "2026-10-31T05:30Z", "2026-11-01T05:30Z", "2026-11-02T06:30Z"]  # once on the 1st, at 01:30 EDT
        assert nexts("0 * * * *", utc(2026, 11, 1, 4, 30), 3, "America/New_York") == [
            "2026-11-01T05:00Z", "2026-11-01T06:00Z", "2026-11-01T07:00Z"]  # 01:00 EDT, 01:00 EST, 02:00 EST

    def test_next_after_never_goes_back_inside_the_repeated_hour(self):
        # 01:10 UTC is 02:10 CET, after the (already passed) 02:30 CEST of that night:
        # the wall clock says 02:30 is ahead, real time says it is over.
        s = cron.parse("30 2 * * *", "Europe/Berlin")
        assert s.next_after(utc(2026, 10, 25, 1, 10)) == utc(2026, 10, 26, 1, 30)


# --------------------------------------------------------------------------------------
# interval_minutes, tier minimum, grace
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression, minutes",
    [
        # upstream-api §2.3 examples
        ("* * * * *", 1), ("*/5 * * * *", 5), ("0,30 * * * *", 30), ("0 * * * *", 60), ("@hourly", 60),
        ("0 */2 * * *", 120), ("0 9 * * *", 1440),
        # the rest of the rule
        ("0,15,30,45 * * * *", 15), ("0,10,20,30,40,50,55 * * * *", 8), ("5 * * * *", 60),
        ("0 0,12 * * *", 720), ("0 1,2,3 * * *", 480), ("0 9-17 * * *", 1440), ("0 9 * * 1", 1440),
        ("*/90 * * * *", 60), ("0 */3 * * *", 180), ("@daily", 1440), ("@minutely", 1), ("@weekly", 1440),
        ("0 9", 1440), ("*/10", 10),
        # upstream's loophole, kept for parity: ranges estimate an hour
        ("0-59 * * * *", 60), ("0-59/5 * * * *", 60), ("5/10 * * * *", 60),
    ],
)
def test_interval_minutes(expression, minutes):
    assert cron.interval_minutes(expression) == minutes


class TestTierMinimum:
    def test_free_refuses_per_minute(self):
        assert cron.min_interval_error("* * * * *", "free") == (
            "Free plan only allows hourly or less frequent schedules. Upgrade to Pro for per-minute scheduling.")
        assert cron.min_interval_error("*/30 * * * *", "free") is not None

    def test_free_allows_hourly(self):
        assert cron.min_interval_error("0 * * * *", "free") is None
        assert cron.min_interval_error("@daily", "free") is None

    @pytest.mark.parametrize("tier", ["pro", "unlimited"])
    def test_pro_and_unlimited_allow_every_minute(self, tier):
        assert cron.min_interval_error("* * * * *", tier) is None

    def test_unknown_tier_is_free(self):
        assert cron.min_interval_error("* * * * *", "enterprise") is not None


@pytest.mark.parametrize("interval, seconds", [(1, 30), (2, 60), (60, 1800), (120, 3600), (1440, 3600)])
def test_grace_seconds(interval, seconds):
    assert cron.grace_seconds(interval) == seconds


# --------------------------------------------------------------------------------------
# validation.parse_cron_create (upstream-api §1.5.1)
# --------------------------------------------------------------------------------------

NOW = datetime(2026, 3, 5, 14, 29, 59, 500000, tzinfo=UTC)
URL = "https://x.io/hook"


def cron_create(tier="unlimited", allow_private=False, **params):
    return V.parse_cron_create({"url": URL, **params}, NOW, tier, allow_private=allow_private)


def cron_errors(tier="unlimited", allow_private=False, **params):
    with pytest.raises(E.ValidationError) as info:
        V.parse_cron_create(params, NOW, tier, allow_private=allow_private)
    return info.value.details


class TestCronCreate:
    def test_defaults(self):
        task = cron_create(cron="0 * * * *")
        assert task == V.NewCronTask(
            name="Cron: https://x.io/hook", url=URL, method="GET", headers_json=b"{}", body=None,
            timeout_ms=30000, retry_attempts=5, callback_url=None, expected_status_codes=None,
            expected_body_pattern=None, queue=None, notify_on_failure=None, notify_on_recovery=None,
            on_failure_url=None, on_recovery_url=None, cron_expression="0 * * * *", timezone=None,
            interval_minutes=60, next_run_at=datetime(2026, 3, 5, 15, 0, tzinfo=UTC), enabled=True,
        )

    def test_parse_create_routes_cron_here(self):
        task = V.parse_create({"url": URL, "cron": "*/5 * * * *", "delay": "5m"}, NOW)
        assert isinstance(task, V.NewCronTask)
        assert task.next_run_at == datetime(2026, 3, 5, 14, 30, tzinfo=UTC)

    def test_fields_are_forwarded(self):
        task = cron_create(
            cron="@daily", name="nightly", method="POST", headers={"X-A": "1"}, body="{}", timeout_ms="5000",
            retry_attempts=0, callback_url="https://cb.io/x", expected_status_codes="200, 204",
            expected_body_pattern="ok", queue="q", notify_on_failure=False, notify_on_recovery="true",
            on_failure_url="https://f.io", on_recovery_url="https://r.io", enabled=True,
            scheduled_at="2030-01-01T00:00:00Z", schedule_type="once", next_run_at="x", interval_minutes=3,
        )
        assert task.name == "nightly" and task.method == "POST" and orjson.loads(task.headers_json) == {"X-A": "1"}
        assert (task.body, task.timeout_ms, task.retry_attempts, task.callback_url) == ("{}", 5000, 0, "https://cb.io/x")
        assert (task.expected_status_codes, task.expected_body_pattern, task.queue) == ("200, 204", "ok", "q")
        assert (task.notify_on_failure, task.notify_on_recovery) == (False, True)
        assert (task.on_failure_url, task.on_recovery_url) == ("https://f.io", "https://r.io")
        assert (task.interval_minutes, task.next_run_at) == (1440, datetime(2026, 3, 6, tzinfo=UTC))

    def test_name_defaults(self):
        assert cron_create(cron="@hourly", url=" https://x.io/a ").name == "Cron:  https://x.io/a "
        assert cron_create(cron="@hourly", name=None).name == "Cron: https://x.io/hook"
        assert cron_create(cron="@hourly", name="").name == "x.io"
        assert cron_create(cron="@hourly", name="   ").name == "x.io"
        long_url = "https://x.io/" + "a" * 242  # 255 characters: the prefixed name would be 261
        name = cron_create(cron="@hourly", url=long_url).name
        assert len(name) == 255 and name.endswith("\u2026") and name.startswith("Cron: https://x.io/aaa")

    def test_enabled_null_means_true_and_false_has_no_next_run(self):
        assert cron_create(cron="@hourly", enabled=None).enabled is True
        task = cron_create(cron="@hourly", enabled=False)
        assert (task.enabled, task.next_run_at, task.interval_minutes) == (False, None, 60)

    def test_timezone(self):
        task = cron_create(cron="0 9 * * *", timezone="Europe/Berlin")
        assert task.timezone == "Europe/Berlin"
        assert task.next_run_at == datetime(2026, 3, 6, 8, 0, tzinfo=UTC)  # 09:00 CET
        assert cron_create(cron="0 9 * * *", timezone="").timezone is None
        assert cron_errors(url=URL, cron="0 9 * * *", timezone="Nowhere/City") == {"timezone": ["is not a valid timezone"]}
        assert cron_errors(url=URL, cron="0 9 * * *", timezone=5) == {"timezone": ["is invalid"]}

    @pytest.mark.parametrize("value, message", [
        ("", "can't be blank"), ("   ", "can't be blank"), (0, "is invalid"), (True, "is invalid"),
        ("@reboot", "is not a valid cron expression"), ("60 * * * *", "is not a valid cron expression"),
        ("* * * * * *", "is not a valid cron expression"), ("x" * 256, "should be at most 255 character(s)"),
    ])
    def test_bad_expression(self, value, message):
        assert cron_errors(url=URL, cron=value) == {"cron_expression": [message]}

    def test_free_tier_minimum_interval(self):
        assert cron_errors("free", url=URL, cron="* * * * *") == {"cron_expression": [
            "Free plan only allows hourly or less frequent schedules. Upgrade to Pro for per-minute scheduling."]}
        assert cron_create("free", cron="0 * * * *").interval_minutes == 60
        assert cron_create("pro", cron="* * * * *").interval_minutes == 1
        assert cron_create("pro", cron="*/5 * * * *").interval_minutes == 5
        assert cron_create("pro", cron="0 9 * * *").interval_minutes == 1440
        assert cron_create(cron="* * * * *").interval_minutes == 1  # unlimited

    def test_ssrf_check_on_url(self):
        assert cron_errors(url="http://localhost:8080/x", cron="@hourly") == {
            "url": ["cannot target private or internal addresses"]}
        assert cron_errors(url="http://10.1.2.3/x", cron="@hourly") == {
            "url": ["cannot target private or internal addresses"]}
        assert cron_create(url="http://127.0.0.1:9/x", cron="@hourly", allow_private=True).url == "http://127.0.0.1:9/x"

    def test_ssrf_default_follows_the_environment(self, monkeypatch):
        params = {"url": "http://127.0.0.1/x", "cron": "@hourly"}
        monkeypatch.setenv("RUNLATER_ALLOW_PRIVATE_TARGETS", "1")
        assert V.parse_cron_create(params, NOW).url == "http://127.0.0.1/x"
        monkeypatch.delenv("RUNLATER_ALLOW_PRIVATE_TARGETS")
        with pytest.raises(E.ValidationError):
            V.parse_cron_create(params, NOW)

    def test_all_errors_together(self):
        assert cron_errors("free", url="ftp://x", cron="* * * * *", method="FETCH", timeout_ms=1) == {
            "url": ["must be a valid HTTP or HTTPS URL"],
            "method": ["is invalid"],
            "timeout_ms": ["must be greater than or equal to 1000"],
            "cron_expression": ["Free plan only allows hourly or less frequent schedules. "
                                "Upgrade to Pro for per-minute scheduling."],
        }

    def test_missing_url(self):
        assert cron_errors(cron="@hourly") == {"url": ["can't be blank"]}

    def test_derive_cron_schedule_for_updates(self):
        assert V.derive_cron_schedule("*/5 * * * *", None, tier="pro", now=NOW) == (
            5, datetime(2026, 3, 5, 14, 30, tzinfo=UTC), {})
        assert V.derive_cron_schedule("*/5 * * * *", None, tier="pro", now=NOW, enabled=False) == (5, None, {})
        assert V.derive_cron_schedule("*/5 * * * *", "Bad/Zone", tier="pro", now=NOW)[2] == {
            "timezone": ["is not a valid timezone"]}
        assert V.derive_cron_schedule("*/5 * * * *", None, tier="free", now=NOW)[2] == {
            "cron_expression": [cron.MIN_INTERVAL_MESSAGE]}

    def test_check_cron_expression(self):
        assert V.check_cron_expression("@weekly") is None
        assert V.check_cron_expression("@reboot") == "is not a valid cron expression"
