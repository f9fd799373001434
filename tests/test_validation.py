"""Unit tests for request validation: upstream's rules and exact messages (upstream-api
§0, §1.3, §1.5, §1.10, §2.1) and our deliberate departures (DECISIONS 5)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from runlater.http import errors as E
from runlater.http import validation as V
from runlater.http.validation import NewTask, parse_create

# Half a second into 14:29:59, so truncation and the +1 s of immediate tasks both show.
NOW = datetime(2026, 3, 5, 14, 29, 59, 500000, tzinfo=UTC)
NOW_S = NOW.replace(microsecond=0)
URL = "https://x.io/hook"

DELAY_FORMAT = "invalid delay format. Use a number with unit: 30s, 5m, 2h, 1d"
DELAY_TYPE = 'delay must be a string (e.g. "30s", "5m") or integer (seconds)'
RUN_AT_MESSAGE = "run_at must be a valid ISO 8601 datetime"


def create(**params):
    return parse_create({"url": URL, **params}, NOW)


def details(**params):
    """The 422 details map of a create that must fail validation."""
    with pytest.raises(E.ValidationError) as info:
        parse_create(params, NOW)
    assert info.value.status == 422
    return info.value.details


def field_errors(field, value, **extra):
    return details(url=URL, **{field: value}, **extra).get(field)


def body_of(exc: E.ApiError):
    response = exc.response()
    return response.status, orjson.loads(response.body)


# --------------------------------------------------------------------------------------
# decode_json_body
# --------------------------------------------------------------------------------------


class TestDecodeBody:
    def test_empty_body_is_empty_params(self):
        assert V.decode_json_body(b"", "application/json") == {}
        assert V.decode_json_body(b"", None) == {}

    def test_json_object(self):
        assert V.decode_json_body(b'{"url":"https://a.io"}', "application/json") == {"url": "https://a.io"}

    def test_media_type_parameters_and_suffix(self):
        assert V.decode_json_body(b'{"a":1}', "application/json; charset=utf-8") == {"a": 1}
        assert V.decode_json_body(b'{"a":1}', "Application/JSON") == {"a": 1}
        assert V.decode_json_body(b'{"a":1}', "application/vnd.api+json") == {"a": 1}

    def test_missing_content_type_is_read_as_json(self):
        assert V.decode_json_body(b'{"a":1}', None) == {"a": 1}

    @pytest.mark.parametrize("raw", [b"{", b'{"a":}', b"nul", b"\xff\xfe", b'{"a":"\\ud800"}', b" "])
    def test_malformed_json_is_framework_400(self, raw):
        with pytest.raises(E.BadRequest) as info:
            V.decode_json_body(raw, "application/json")
        assert body_of(info.value) == (400, {"errors": {"detail": "Bad Request"}})

    @pytest.mark.parametrize("raw", [b"[]", b'[{"url":"https://a.io"}]', b"1", b'"x"', b"null", b"true"])
    def test_non_object_json_is_framework_400(self, raw):
        with pytest.raises(E.BadRequest) as info:
            V.decode_json_body(raw, "application/json")
        assert body_of(info.value) == (400, {"errors": {"detail": "Bad Request"}})

    def test_form_body_flat_and_bracketed_keys(self):
        raw = b"url=https%3A%2F%2Fa.io%2Fx&timeout_ms=5000&headers[X-Key]=a+b&headers[X-Other]=c&tags[]=1&tags[]=2"
        assert V.decode_json_body(raw, "application/x-www-form-urlencoded; charset=utf-8") == {
            "url": "https://a.io/x",
            "timeout_ms": "5000",
            "headers": {"X-Key": "a b", "X-Other": "c"},
            "tags": ["1", "2"],
        }

    def test_form_body_task_wrapper(self):
        params = V.decode_json_body(b"task[url]=https://a.io&task[method]=GET", "application/x-www-form-urlencoded")
        assert V.merge_params("", params) == {"url": "https://a.io", "method": "GET"}

    def test_form_body_odd_brackets_stay_literal(self):
        raw = b"[x]=1&a[]b=2&a[][c]=3"
        assert V.decode_json_body(raw, "application/x-www-form-urlencoded") == {"[x]": "1", "a[]b": "2", "a[][c]": "3"}

    @pytest.mark.parametrize("raw", [b"url=%ff", b"url=\xff"])
    def test_form_body_not_utf8_is_400(self, raw):
        with pytest.raises(E.BadRequest):
            V.decode_json_body(raw, "application/x-www-form-urlencoded")

    def test_other_content_types_are_ignored(self):
        assert V.decode_json_body(b'{"url":"https://a.io"}', "text/plain") == {}
        assert V.decode_json_body(b"--b\r\n", "multipart/form-data; boundary=b") == {}


# --------------------------------------------------------------------------------------
# merge_params
# --------------------------------------------------------------------------------------


class TestMergeParams:
    def test_query_and_body_merge_body_wins(self):
        merged = V.merge_params("delay=5m&method=GET", {"method": "PUT", "url": URL})
        assert merged == {"delay": "5m", "method": "PUT", "url": URL}

    def test_query_only(self):
        assert V.merge_params("delay=5m", {}) == {"delay": "5m"}

    def test_no_query_returns_body(self):
        body = {"url": URL}
        assert V.merge_params("", body) == body

    def test_task_wrapper_replaces_everything(self):
        merged = V.merge_params("delay=5m", {"task": {"url": URL, "method": "GET"}, "name": "outer"})
        assert merged == {"url": URL, "method": "GET"}

    def test_task_wrapper_wins_over_flat_keys(self):
        assert V.merge_params("", {"url": "https://outer.io", "task": {"url": URL}}) == {"url": URL}

    @pytest.mark.parametrize("task", ["x", 1, None, ["a"]])
    def test_non_object_task_key_keeps_flat_params(self, task):
        assert V.merge_params("", {"url": URL, "task": task}) == {"url": URL, "task": task}

    def test_query_delay_applies_to_create(self):
        task = parse_create(V.merge_params("delay=5m", {"url": URL}), NOW)
        assert task.scheduled_at == NOW_S + timedelta(minutes=5)

    def test_bad_query_encoding_is_400(self):
        with pytest.raises(E.BadRequest):
            V.merge_params("delay=%ff", {})


# --------------------------------------------------------------------------------------
# parse_create: schedule
# --------------------------------------------------------------------------------------


class TestImmediate:
    def test_now_plus_one_second_truncated(self):
        task = create()
        assert task.scheduled_at == datetime(2026, 3, 5, 14, 30, 0, tzinfo=UTC)
        assert task.scheduled_at.microsecond == 0
        assert task.scheduled_at.utcoffset() == timedelta(0)

    def test_follows_the_clock_across_seconds_and_backwards(self):
        later = parse_create({"url": URL}, NOW + timedelta(seconds=3, microseconds=700000))
        earlier = parse_create({"url": URL}, NOW - timedelta(hours=1))
        again = parse_create({"url": URL}, NOW)
        assert later.scheduled_at == datetime(2026, 3, 5, 14, 30, 4, tzinfo=UTC)
        assert earlier.scheduled_at == datetime(2026, 3, 5, 13, 30, 0, tzinfo=UTC)
        assert earlier.name == f"{URL} · 05 Mar, 13:30"
        assert again.scheduled_at == datetime(2026, 3, 5, 14, 30, 0, tzinfo=UTC)

    @pytest.mark.parametrize("key", ["schedule_type", "cron_expression", "scheduled_at", "interval_minutes"])
    def test_model_schedule_keys_are_ignored_on_create(self, key):
        task = create(**{key: "2030-01-01T00:00:00Z" if key == "scheduled_at" else "cron"})
        assert task.scheduled_at == NOW_S + timedelta(seconds=1)


class TestDelay:
    @pytest.mark.parametrize(
        "delay, seconds",
        [(1, 1), (30, 30), (86400 * 400, 86400 * 400), ("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400),
         ("007s", 7), ("1000d", 86400000)],
    )
    def test_valid(self, delay, seconds):
        assert create(delay=delay).scheduled_at == NOW_S + timedelta(seconds=seconds)

    def test_result_is_whole_second_utc(self):
        at = create(delay="30s").scheduled_at
        assert at.microsecond == 0 and at.tzinfo is not None and at.utcoffset() == timedelta(0)

    @pytest.mark.parametrize(
        "delay, message",
        [
            (0, "delay must be a positive number"),
            (-5, "delay must be a positive number"),
            ("0s", "delay must be greater than 0"),
            ("000m", "delay must be greater than 0"),
            ("", "delay is required"),
            ("30", DELAY_FORMAT),
            ("abc", DELAY_FORMAT),
            ("1h30m", DELAY_FORMAT),
            ("5 m", DELAY_FORMAT),
            (" 5m", DELAY_FORMAT),
            ("5m ", DELAY_FORMAT),
            ("30S", DELAY_FORMAT),
            ("-5m", DELAY_FORMAT),
            ("+5m", DELAY_FORMAT),
            ("1.5h", DELAY_FORMAT),
            ("s", DELAY_FORMAT),
            ("５m", DELAY_FORMAT),
            ("5w", DELAY_FORMAT),
            (1.5, DELAY_TYPE),
            (30.0, DELAY_TYPE),
            ({}, DELAY_TYPE),
            ({"seconds": 5}, DELAY_TYPE),
            ([30], DELAY_TYPE),
            (True, DELAY_TYPE),
        ],
    )
    def test_invalid(self, delay, message):
        with pytest.raises(E.InvalidDelay) as info:
            create(delay=delay)
        assert info.value.value == delay
        assert body_of(info.value) == (400, {"error": {"code": "invalid_delay", "message": message}})

    @pytest.mark.parametrize("delay", ["99999999999d", "9" * 19 + "s", "9" * 5000 + "s", 2**63, 10**12])
    def test_beyond_representable_time_is_400_not_crash(self, delay):
        with pytest.raises(E.InvalidDelay) as info:
            create(delay=delay)
        assert info.value.message == "delay is too large"

    def test_delay_error_comes_before_field_errors(self):
        with pytest.raises(E.InvalidDelay):
            parse_create({"url": "ftp://x", "method": "nope", "delay": "abc"}, NOW)


class TestRunAt:
    @pytest.mark.parametrize(
        "run_at, expected",
        [
            ("2026-03-05T15:00:00Z", datetime(2026, 3, 5, 15, 0, 0, tzinfo=UTC)),
            ("2026-03-05T15:00:00z", datetime(2026, 3, 5, 15, 0, 0, tzinfo=UTC)),
            ("2026-03-05t15:00:00Z", datetime(2026, 3, 5, 15, 0, 0, tzinfo=UTC)),
            ("2026-03-05T17:00:00+02:00", datetime(2026, 3, 5, 15, 0, 0, tzinfo=UTC)),
            ("2026-03-05T10:30:00-04:30", datetime(2026, 3, 5, 15, 0, 0, tzinfo=UTC)),
            ("2026-03-05T17:00:00+0200", datetime(2026, 3, 5, 15, 0, 0, tzinfo=UTC)),
            ("2026-03-05 15:00:00Z", datetime(2026, 3, 5, 15, 0, 0, tzinfo=UTC)),
            ("2026-03-05T15:00:00.999999Z", datetime(2026, 3, 5, 15, 0, 0, tzinfo=UTC)),
            ("2026-03-05T15:00:00.5+00:00", datetime(2026, 3, 5, 15, 0, 0, tzinfo=UTC)),
            ("2026-03-05T15:00:00,123Z", datetime(2026, 3, 5, 15, 0, 0, tzinfo=UTC)),
            ("2026-03-06T01:00:00+10:00", datetime(2026, 3, 5, 15, 0, 0, tzinfo=UTC)),
        ],
    )
    def test_valid(self, run_at, expected):
        at = create(run_at=run_at).scheduled_at
        assert at == expected
        assert at.microsecond == 0 and at.utcoffset() == timedelta(0)

    @pytest.mark.parametrize(
        "run_at",
        [
            "2026-03-05T15:00:00",  # offset is mandatory
            "2026-03-05 15:00:00",
            "2026-03-05T15:00Z",  # seconds are mandatory
            "2026-03-05",
            "2026-03-05T15:00:00.Z",
            "2026-03-05T15:00:00+2:00",
            "2026-03-05T15:00:00+02:0",
            "2026-03-05T15:00:00+24:00",
            "2026-03-05T15:00:00 Z",
            "2026-03-05X15:00:00Z",
            "2026-02-30T15:00:00Z",
            "2026-03-05T24:00:00Z",
            "2026-13-05T15:00:00Z",
            "0000-01-01T00:00:00Z",
            "20260305T150000Z",
            "2026-W10-4T15:00:00Z",
            "tomorrow",
            "",
            "２026-03-05T15:00:00Z",
        ],
    )
    def test_unparsable_is_400(self, run_at):
        with pytest.raises(E.InvalidRunAt) as info:
            create(run_at=run_at)
        assert body_of(info.value) == (400, {"error": {"code": "invalid_run_at", "message": RUN_AT_MESSAGE}})

    @pytest.mark.parametrize("run_at", [1772722800, 1772722800.5, {"at": "x"}, ["2026-03-05T15:00:00Z"], True])
    def test_non_string_is_the_same_400(self, run_at):
        with pytest.raises(E.InvalidRunAt) as info:
            create(run_at=run_at)
        assert info.value.value == run_at
        assert body_of(info.value)[1]["error"]["message"] == RUN_AT_MESSAGE

    def test_up_to_300_seconds_in_the_past_is_accepted(self):
        at = NOW - timedelta(seconds=299)
        task = create(run_at=at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        assert task.scheduled_at == at.replace(microsecond=0)

    def test_older_than_300_seconds_is_422_scheduled_at(self):
        at = NOW - timedelta(seconds=301)
        assert details(url=URL, run_at=at.strftime("%Y-%m-%dT%H:%M:%SZ")) == {"scheduled_at": ["must be in the future"]}

    def test_past_error_is_collected_with_field_errors(self):
        assert details(url="ftp://x.io", run_at="2000-01-01T00:00:00Z") == {
            "url": ["must be a valid HTTP or HTTPS URL"],
            "scheduled_at": ["must be in the future"],
        }

    def test_extreme_offsets_at_the_calendar_edges_are_400(self):
        for run_at in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
            with pytest.raises(E.InvalidRunAt):
                create(run_at=run_at)


class TestPrecedence:
    def test_cron_wins_over_everything(self):
        task = create(cron="0 * * * *", delay="5m", run_at="2026-03-05T15:00:00Z")
        assert isinstance(task, V.NewCronTask)
        assert task.cron_expression == "0 * * * *"

    def test_cron_error_response(self):
        with pytest.raises(E.ValidationError) as info:
            create(cron="61 * * * *")
        assert info.value.response().body == (
            b'{"error":{"code":"validation_error","details":{"cron_expression":["is not a valid cron expression"]}}}'
        )

    @pytest.mark.parametrize("cron", ["", 0, "garbage"])
    def test_empty_string_and_zero_cron_are_present(self, cron):
        assert "cron_expression" in details(url=URL, cron=cron, delay="5m")

    @pytest.mark.parametrize("cron", [None, False])
    def test_null_and_false_cron_are_absent(self, cron):
        assert create(cron=cron, delay="5m").scheduled_at == NOW_S + timedelta(minutes=5)

    def test_delay_wins_over_run_at(self):
        task = create(delay="30s", run_at="2026-03-05T18:00:00Z")
        assert task.scheduled_at == NOW_S + timedelta(seconds=30)

    def test_delay_zero_is_present_and_wins(self):
        with pytest.raises(E.InvalidDelay) as info:
            create(delay=0, run_at="2026-03-05T18:00:00Z")
        assert info.value.message == "delay must be a positive number"

    def test_delay_empty_string_is_present_and_wins(self):
        with pytest.raises(E.InvalidDelay) as info:
            create(delay="", run_at="2026-03-05T18:00:00Z")
        assert info.value.message == "delay is required"

    @pytest.mark.parametrize("delay", [None, False])
    def test_null_and_false_delay_fall_through_to_run_at(self, delay):
        task = create(delay=delay, run_at="2026-03-05T18:00:00Z")
        assert task.scheduled_at == datetime(2026, 3, 5, 18, 0, 0, tzinfo=UTC)

    @pytest.mark.parametrize("run_at", [None, False])
    def test_null_and_false_run_at_mean_immediate(self, run_at):
        assert create(delay=None, run_at=run_at).scheduled_at == NOW_S + timedelta(seconds=1)

    def test_run_at_empty_string_is_present(self):
        with pytest.raises(E.InvalidRunAt):
            create(run_at="")


def test_cron_is_one_replaceable_function(monkeypatch):
    sentinel = object()
    monkeypatch.setattr(V, "parse_cron_create", lambda params, now: sentinel)
    assert parse_create({"url": URL, "cron": "0 * * * *"}, NOW) is sentinel


# --------------------------------------------------------------------------------------
# parse_create: fields
# --------------------------------------------------------------------------------------


class TestNewTask:
    def test_minimal_create_defaults(self):
        task = parse_create({"url": URL}, NOW)
        assert isinstance(task, NewTask)
        assert task == NewTask(
            name=f"{URL} · 05 Mar, 14:30",
            url=URL,
            method="POST",
            headers_json=b"{}",
            body=None,
            scheduled_at=datetime(2026, 3, 5, 14, 30, 0, tzinfo=UTC),
            timeout_ms=30000,
            retry_attempts=5,
            callback_url=None,
            expected_status_codes=None,
            expected_body_pattern=None,
            queue=None,
            notify_on_failure=None,
            notify_on_recovery=None,
            on_failure_url=None,
            on_recovery_url=None,
        )

    def test_fields_are_exactly_the_insert_columns(self):
        assert NewTask._fields == (
            "name", "url", "method", "headers_json", "body", "scheduled_at", "timeout_ms", "retry_attempts",
            "callback_url", "expected_status_codes", "expected_body_pattern", "queue", "notify_on_failure",
            "notify_on_recovery", "on_failure_url", "on_recovery_url",
        )

    def test_every_field_passes_through(self):
        task = parse_create(
            {
                "url": URL, "name": "nightly", "method": "PUT", "headers": {"X-A": "1"}, "body": "{}",
                "timeout_ms": 5000, "retry_attempts": 0, "callback_url": "https://cb.io/done",
                "expected_status_codes": "200,204", "expected_body_pattern": "ok", "queue": "payments",
                "notify_on_failure": True, "notify_on_recovery": False,
                "on_failure_url": "https://f.io", "on_recovery_url": "http://r.io/x",
                "unknown": "ignored", "id": "ignored",
            },
            NOW,
        )
        assert task == NewTask(
            "nightly", URL, "PUT", b'{"X-A":"1"}', "{}", NOW_S + timedelta(seconds=1), 5000, 0,
            "https://cb.io/done", "200,204", "ok", "payments", True, False, "https://f.io", "http://r.io/x",
        )

    def test_null_fields_take_defaults(self):
        task = create(name=None, method=None, headers=None, body=None, timeout_ms=None, retry_attempts=None)
        assert (task.method, task.headers_json, task.body, task.timeout_ms, task.retry_attempts) == (
            "POST", b"{}", None, 30000, 5,
        )

    @pytest.mark.parametrize("enabled", [False, None, "garbage", {}])
    def test_enabled_is_ignored_for_one_time_tasks(self, enabled):
        assert create(enabled=enabled).url == URL

    def test_upstream_immediate_example(self):
        # upstream task_controller_test: url, method and body → accepted
        task = create(method="POST", body='{"test": true}')
        assert task.body == '{"test": true}'


class TestUrl:
    @pytest.mark.parametrize(
        "url",
        [
            "https://x.io", "http://x.io", "HTTPS://X.IO/Path", "https://x.io:8443/a?b=c#d", "http://user:pw@x.io/",
            "http://[::1]:8080/", "http://127.0.0.1/", "https://x.io?q=1", "https://bücher.example/ä",
        ],
    )
    def test_valid(self, url):
        assert create(url=url).url == url

    def test_surrounding_whitespace_is_trimmed(self):
        task = create(url="  \thttps://x.io/hook \n")
        assert task.url == "https://x.io/hook"
        assert task.name == "https://x.io/hook · 05 Mar, 14:30"

    @pytest.mark.parametrize("url", [None, "", "   ", "\t\n"])
    def test_missing_or_blank(self, url):
        params = {} if url is None else {"url": url}
        assert details(**params) == {"url": ["can't be blank"]}

    @pytest.mark.parametrize(
        "url",
        [
            "not-a-valid-url", "ftp://x.io/file", "x.io/hook", "https:/x.io", "https://", "http:///path",
            "http://:80/", "http://user@/", "https://?q", "http://[]/", "mailto:a@x.io", "//x.io",
            "https://x.io/a b", "https://x.io/\r\nX: y", "https://x.io/\u200bz",
        ],
    )
    def test_not_http_or_no_host(self, url):
        assert details(url=url) == {"url": ["must be a valid HTTP or HTTPS URL"]}

    @pytest.mark.parametrize("url", [123, True, ["https://x.io"], {"href": "https://x.io"}])
    def test_wrong_type(self, url):
        assert details(url=url) == {"url": ["is invalid"]}

    def test_255_characters_ok_256_too_long(self):
        base = "https://x.io/"
        ok = base + "a" * (255 - len(base))
        assert len(create(url=ok).url) == 255
        assert details(url=ok + "a") == {"url": ["should be at most 255 character(s)"]}

    def test_too_long_and_invalid_reports_both(self):
        assert details(url="ftp://" + "a" * 300) == {
            "url": ["must be a valid HTTP or HTTPS URL", "should be at most 255 character(s)"]
        }

    def test_length_is_checked_after_trimming(self):
        url = "https://x.io/" + "a" * 242
        assert create(url=f"   {url}   ").url == url


class TestName:
    def test_default_format(self):
        assert create().name == "https://x.io/hook · 05 Mar, 14:30"
        assert "\u00b7" in create().name

    @pytest.mark.parametrize(
        "now, expected",
        [
            (datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC), "01 Jan, 00:00"),
            (datetime(2026, 12, 31, 23, 58, 59, 999999, tzinfo=UTC), "31 Dec, 23:59"),
            (datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC), "01 Jan, 00:00"),
            (datetime(2026, 9, 9, 9, 9, 9, tzinfo=UTC), "09 Sep, 09:09"),
        ],
    )
    def test_default_uses_scheduled_time(self, now, expected):
        assert parse_create({"url": URL}, now).name == f"{URL} · {expected}"

    def test_default_uses_delayed_time(self):
        assert create(delay="1d").name == f"{URL} · 06 Mar, 14:29"
        assert create(run_at="2026-07-04T08:05:00+02:00").name == f"{URL} · 04 Jul, 06:05"

    @pytest.mark.parametrize("name", ["", "   "])
    def test_blank_name_gets_default(self, name):
        assert create(name=name).name == f"{URL} · 05 Mar, 14:30"

    def test_given_name_is_kept_verbatim(self):
        assert create(name="  My task  ").name == "  My task  "

    def test_long_url_is_truncated_to_fit_255(self):
        url = "https://x.io/" + "p" * (255 - len("https://x.io/"))
        name = create(url=url).name
        assert len(name) == 255
        assert name == url[:238] + "\u2026 · 05 Mar, 14:30"

    def test_url_of_239_characters_is_not_truncated(self):
        url = "https://x.io/" + "p" * (239 - len("https://x.io/"))
        name = create(url=url).name
        assert name == url + " · 05 Mar, 14:30" and len(name) == 255

    def test_name_limits(self):
        assert create(name="n" * 255).name == "n" * 255
        assert field_errors("name", "n" * 256) == ["should be at most 255 character(s)"]
        assert field_errors("name", 5) == ["is invalid"]

    def test_default_name_helper(self):
        assert V.default_name("https://a.io", datetime(2026, 3, 5, 14, 30, tzinfo=UTC)) == "https://a.io · 05 Mar, 14:30"


class TestMethod:
    @pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    def test_valid(self, method):
        assert create(method=method).method == method

    def test_default_post(self):
        assert create().method == "POST"

    @pytest.mark.parametrize("method", ["get", "Post", "TRACE", "CONNECT", "FOO", " GET"])
    def test_case_sensitive_list(self, method):
        assert field_errors("method", method) == ["is invalid"]

    @pytest.mark.parametrize("method", ["", "  "])
    def test_blank_is_an_error_not_a_crash(self, method):
        assert field_errors("method", method) == ["can't be blank"]

    @pytest.mark.parametrize("method", [1, True, ["GET"], {"GET": 1}])
    def test_wrong_type(self, method):
        assert field_errors("method", method) == ["is invalid"]


class TestHeaders:
    def test_default_is_empty_object(self):
        assert create().headers_json == b"{}"
        assert create(headers={}).headers_json == b"{}"

    def test_object_is_stored_as_given(self):
        headers = {"Authorization": "Bearer t", "X-Count": 3, "X-Ratio": 1.5, "X-Flag": True, "X-None": None}
        assert orjson.loads(create(headers=headers).headers_json) == headers

    @pytest.mark.parametrize("headers", [[], ["X-A: 1"], "X-A: 1", 5, True])
    def test_not_an_object(self, headers):
        assert field_errors("headers", headers) == ["is invalid"]

    def test_blank_string_is_an_error(self):
        assert field_errors("headers", "") == ["can't be blank"]

    @pytest.mark.parametrize("value", [{"a": 1}, [1, 2]])
    def test_structured_values_are_refused(self, value):
        assert field_errors("headers", {"X-A": value}) == ["header values must be strings, numbers, booleans or null"]

    @pytest.mark.parametrize("name", ["", "X A", "X:A", "X\nA", "Ä", "X\x00"])
    def test_invalid_header_names(self, name):
        assert field_errors("headers", {name: "v"}) == ["contains an invalid header name"]

    @pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\x00b"])
    def test_values_with_line_breaks_or_nul(self, value):
        assert field_errors("headers", {"X-A": value}) == ["header values must not contain line breaks or null characters"]

    def test_each_problem_reported_once(self):
        assert field_errors("headers", {"a b": {}, "c d": [], "X": "\n"}) == [
            "contains an invalid header name",
            "header values must be strings, numbers, booleans or null",
            "header values must not contain line breaks or null characters",
        ]


class TestBody:
    def test_absent_and_blank_are_null(self):
        assert create().body is None
        assert create(body="").body is None
        assert create(body="  \n").body is None

    def test_kept_verbatim(self):
        assert create(body='  {"a": 1}\n').body == '  {"a": 1}\n'

    def test_size_limit_in_bytes(self):
        assert len(create(body="a" * 262144).body) == 262144
        assert field_errors("body", "a" * 262145) == ["must be less than 256KB"]

    def test_multibyte_characters_count_as_bytes(self):
        assert create(body="é" * 131072).body  # 262144 bytes
        assert field_errors("body", "é" * 131072 + "a") == ["must be less than 256KB"]
        assert field_errors("body", "€" * 90000) == ["must be less than 256KB"]  # 270000 bytes

    @pytest.mark.parametrize("body", [{"a": 1}, [1], 5, True])
    def test_must_be_a_string(self, body):
        assert field_errors("body", body) == ["is invalid"]


class TestNumbers:
    @pytest.mark.parametrize(
        "value, error",
        [
            (999, "must be greater than or equal to 1000"),
            (1000, None),
            (300000, None),
            (300001, "must be less than or equal to 300000"),
            (-1, "must be greater than or equal to 1000"),
            ("5000", None),
            ("+5000", None),
            ("999", "must be greater than or equal to 1000"),
            ("9" * 40, "must be less than or equal to 300000"),
            ("5000abc", "is invalid"),
            (" 5000", "is invalid"),
            ("5_000", "is invalid"),
            ("５０００", "is invalid"),
            ("5000.0", "is invalid"),
            (5000.0, "is invalid"),
            (True, "is invalid"),
            ([5000], "is invalid"),
        ],
    )
    def test_timeout_ms(self, value, error):
        if error is None:
            assert create(timeout_ms=value).timeout_ms == int(value)
        else:
            assert field_errors("timeout_ms", value) == [error]

    @pytest.mark.parametrize(
        "value, error",
        [
            (-1, "must be greater than or equal to 0"),
            (0, None),
            (10, None),
            (11, "must be less than or equal to 10"),
            ("3", None),
            ("-1", "must be greater than or equal to 0"),
            ("three", "is invalid"),
            (2.0, "is invalid"),
            (False, "is invalid"),
        ],
    )
    def test_retry_attempts(self, value, error):
        if error is None:
            assert create(retry_attempts=value).retry_attempts == int(value)
        else:
            assert field_errors("retry_attempts", value) == [error]

    def test_blank_string_is_an_error_null_is_default(self):
        assert field_errors("timeout_ms", "") == ["can't be blank"]
        assert field_errors("retry_attempts", " ") == ["can't be blank"]
        assert create(timeout_ms=None).timeout_ms == 30000

    def test_coerced_values_are_ints(self):
        task = create(timeout_ms="5000", retry_attempts="3")
        assert type(task.timeout_ms) is int and type(task.retry_attempts) is int


class TestUrlsAndAssertions:
    @pytest.mark.parametrize("field", ["callback_url", "on_failure_url", "on_recovery_url"])
    def test_action_urls(self, field):
        assert getattr(create(**{field: "https://cb.io/x"}), field) == "https://cb.io/x"
        assert getattr(create(**{field: ""}), field) is None
        assert field_errors(field, "not-a-url") == ["must be a valid HTTP or HTTPS URL"]
        assert field_errors(field, "ftp://cb.io") == ["must be a valid HTTP or HTTPS URL"]
        assert field_errors(field, " https://cb.io") == ["must be a valid HTTP or HTTPS URL"]
        assert field_errors(field, 5) == ["is invalid"]

    def test_callback_url_length(self):
        url = "https://cb.io/" + "c" * (255 - 14)
        assert create(callback_url=url).callback_url == url
        assert field_errors("callback_url", url + "c") == ["should be at most 255 character(s)"]
        assert create(on_failure_url=url + "c" * 100).on_failure_url == url + "c" * 100  # text column upstream

    @pytest.mark.parametrize("codes", ["200", "200, 201, 204", "200,,204", " 301 ", ",", "100,599", "0200"])
    def test_status_codes_valid_and_stored_verbatim(self, codes):
        expected = codes if codes.strip() else None
        assert create(expected_status_codes=codes).expected_status_codes == expected

    @pytest.mark.parametrize(
        "codes, count",
        [("abc", 1), ("200,999", 1), ("99", 1), ("600", 1), ("abc,999,200", 2), ("200;201", 1), ("2 00", 1),
         ("1" * 5000, 1), ("-200", 1)],
    )
    def test_status_codes_invalid_once_per_bad_segment(self, codes, count):
        assert field_errors("expected_status_codes", codes) == [
            "must be comma-separated HTTP status codes (100-599)"
        ] * count

    def test_status_codes_type(self):
        assert field_errors("expected_status_codes", [200]) == ["is invalid"]
        assert field_errors("expected_status_codes", 200) == ["is invalid"]

    def test_body_pattern(self):
        assert create(expected_body_pattern='"ok":true').expected_body_pattern == '"ok":true'
        assert create(expected_body_pattern="").expected_body_pattern is None
        assert field_errors("expected_body_pattern", {"re": "x"}) == ["is invalid"]


class TestQueueAndFlags:
    def test_queue(self):
        assert create(queue="payments").queue == "payments"
        assert create(queue="").queue is None
        assert create(queue="   ").queue is None
        assert create(queue="q" * 255).queue == "q" * 255
        assert field_errors("queue", "q" * 256) == ["should be at most 255 character(s)"]
        assert field_errors("queue", 7) == ["is invalid"]

    @pytest.mark.parametrize(
        "value, expected",
        [(True, True), (False, False), (None, None), ("true", True), ("false", False), ("1", True), ("0", False),
         ("", None)],
    )
    @pytest.mark.parametrize("field", ["notify_on_failure", "notify_on_recovery"])
    def test_notify_flags(self, field, value, expected):
        assert getattr(create(**{field: value}), field) is expected

    @pytest.mark.parametrize("value", ["yes", "TRUE", 1, 0, [], {}])
    def test_notify_flag_invalid(self, value):
        assert field_errors("notify_on_failure", value) == ["is invalid"]


class TestNul:
    """PostgreSQL text and jsonb cannot hold U+0000; it must never reach an insert."""

    @pytest.mark.parametrize(
        "field", ["name", "url", "body", "queue", "callback_url", "on_failure_url", "on_recovery_url",
                  "expected_body_pattern", "expected_status_codes"],
    )
    def test_string_fields(self, field):
        value = "https://x.io/a\x00b" if "url" in field else "a\x00b"
        params = {"url": URL, field: value}
        assert details(**params) == {field: ["must not contain null characters"]}

    def test_header_names_and_values(self):
        assert field_errors("headers", {"X\x00": "v"}) == ["contains an invalid header name"]
        assert field_errors("headers", {"X": "v\x00"}) == [
            "header values must not contain line breaks or null characters"
        ]

    def test_method_with_nul_is_invalid(self):
        assert field_errors("method", "GET\x00") == ["is invalid"]


class TestErrorCollection:
    def test_all_field_errors_in_one_422(self):
        got = details(
            url="ftp://x", method="get", headers=[], body=5, timeout_ms=1, retry_attempts=11,
            callback_url="nope", expected_status_codes="abc", queue="q" * 300, notify_on_failure="maybe",
        )
        assert got == {
            "url": ["must be a valid HTTP or HTTPS URL"],
            "method": ["is invalid"],
            "headers": ["is invalid"],
            "body": ["is invalid"],
            "timeout_ms": ["must be greater than or equal to 1000"],
            "retry_attempts": ["must be less than or equal to 10"],
            "callback_url": ["must be a valid HTTP or HTTPS URL"],
            "expected_status_codes": ["must be comma-separated HTTP status codes (100-599)"],
            "queue": ["should be at most 255 character(s)"],
            "notify_on_failure": ["is invalid"],
        }

    def test_missing_url_is_reported_with_other_errors(self):
        assert details(method="nope", timeout_ms=0) == {
            "method": ["is invalid"],
            "timeout_ms": ["must be greater than or equal to 1000"],
            "url": ["can't be blank"],
        }

    def test_422_body_shape_and_offending_params(self):
        params = {"url": "not-a-valid-url"}
        with pytest.raises(E.ValidationError) as info:
            parse_create(params, NOW)
        assert info.value.value is params
        assert info.value.response().status == 422
        assert info.value.response().body == (
            b'{"error":{"code":"validation_error","details":{"url":["must be a valid HTTP or HTTPS URL"]}}}'
        )

    def test_task_wrapper_end_to_end(self):
        params = V.merge_params("", V.decode_json_body(b'{"task":{"url":"https://x.io/hook","delay":"2h"}}', None))
        assert create(**params).scheduled_at == NOW_S + timedelta(hours=2)


# --------------------------------------------------------------------------------------
# validate_task_fields (the update / sync path)
# --------------------------------------------------------------------------------------


class TestValidateTaskFields:
    def test_partial_checks_only_given_fields(self):
        assert V.validate_task_fields({"name": "new"}, partial=True) == ({"name": "new"}, {})

    def test_partial_uses_model_names_and_ignores_shorthands(self):
        clean, errors = V.validate_task_fields({"delay": "5m", "cron": "x", "id": "1", "timeout_ms": "2000"}, partial=True)
        assert (clean, errors) == ({"timeout_ms": 2000}, {})

    def test_partial_null_or_blank_not_null_columns(self):
        clean, errors = V.validate_task_fields(
            {"url": None, "method": "", "enabled": None, "timeout_ms": None, "headers": " "}, partial=True
        )
        assert clean == {}
        assert errors == {
            "url": ["can't be blank"], "method": ["can't be blank"], "enabled": ["can't be blank"],
            "timeout_ms": ["can't be blank"], "headers": ["can't be blank"],
        }

    def test_partial_blank_nullable_columns_become_null(self):
        clean, errors = V.validate_task_fields(
            {"queue": "", "callback_url": None, "body": "  ", "notify_on_failure": "", "name": ""}, partial=True
        )
        assert errors == {}
        assert clean == {"queue": None, "callback_url": None, "body": None, "notify_on_failure": None, "name": None}

    def test_full_empty_attrs(self):
        assert V.validate_task_fields({}, partial=False)[1] == {
            "url": ["can't be blank"],
            "schedule_type": ["can't be blank"],
        }

    def test_full_once_with_defaults(self):
        clean, errors = V.validate_task_fields(
            {"url": "https://x.io/a", "schedule_type": "once", "scheduled_at": "2026-03-05T15:00:00"}, partial=False
        )
        assert errors == {}
        assert clean == {
            "url": "https://x.io/a", "schedule_type": "once",
            "scheduled_at": datetime(2026, 3, 5, 15, 0, tzinfo=UTC),
            "method": "GET", "headers": {}, "enabled": True, "timeout_ms": 30000, "retry_attempts": 5,
            "name": "x.io",
        }

    def test_default_headers_are_a_fresh_dict(self):
        first, _ = V.validate_task_fields({"url": URL, "schedule_type": "once", "scheduled_at": NOW}, partial=False)
        first["headers"]["X"] = "mutated"
        second, _ = V.validate_task_fields({"url": URL, "schedule_type": "once", "scheduled_at": NOW}, partial=False)
        assert second["headers"] == {}
        assert create().headers_json == b"{}"

    def test_schedule_requirements(self):
        assert V.validate_task_fields({"url": URL, "schedule_type": "once"}, partial=False)[1] == {
            "scheduled_at": ["can't be blank"]
        }
        assert V.validate_task_fields({"url": URL, "schedule_type": "cron"}, partial=False)[1] == {
            "cron_expression": ["can't be blank"]
        }
        assert V.validate_task_fields({"url": URL, "schedule_type": "daily"}, partial=False)[1] == {
            "schedule_type": ["is invalid"]
        }

    def test_cron_expression_uses_the_cron_hook(self):
        assert V.validate_task_fields({"cron_expression": "0 * * * *"}, partial=True)[1] == {}
        assert V.validate_task_fields({"cron_expression": "0 * * *  * *"}, partial=True)[1] == {
            "cron_expression": ["is not a valid cron expression"]
        }

    @pytest.mark.parametrize(
        "value, expected",
        [
            ("2026-03-05T15:00:00Z", datetime(2026, 3, 5, 15, 0, tzinfo=UTC)),
            ("2026-03-05T15:00:00", datetime(2026, 3, 5, 15, 0, tzinfo=UTC)),
            ("2026-03-05 17:00:00.25+02:00", datetime(2026, 3, 5, 15, 0, tzinfo=UTC)),
            (datetime(2026, 3, 5, 15, 0, 0, 999, tzinfo=UTC), datetime(2026, 3, 5, 15, 0, tzinfo=UTC)),
        ],
    )
    def test_scheduled_at_cast(self, value, expected):
        assert V.validate_task_fields({"scheduled_at": value}, partial=True)[0] == {"scheduled_at": expected}

    @pytest.mark.parametrize("value", ["soon", 1772722800, "2026-03-05"])
    def test_scheduled_at_invalid(self, value):
        assert V.validate_task_fields({"scheduled_at": value}, partial=True)[1] == {"scheduled_at": ["is invalid"]}

    def test_scheduled_at_future_check_only_with_now(self):
        old = {"scheduled_at": "2026-03-05T14:00:00Z"}
        assert V.validate_task_fields(old, partial=True)[1] == {}
        assert V.validate_task_fields(old, partial=True, now=NOW)[1] == {"scheduled_at": ["must be in the future"]}

    def test_enabled_cast(self):
        assert V.validate_task_fields({"enabled": "false"}, partial=True)[0] == {"enabled": False}
        assert V.validate_task_fields({"enabled": "nope"}, partial=True)[1] == {"enabled": ["is invalid"]}

    def test_upstream_bad_url_update(self):
        assert V.validate_task_fields({"url": "bad-url"}, partial=True)[1] == {
            "url": ["must be a valid HTTP or HTTPS URL"]
        }


@pytest.mark.parametrize(
    "url, host",
    [("https://x.io/a", "x.io"), ("HTTP://u:p@X.io:80", "X.io"), ("http://[::1]:1/", "::1"), ("http://:80", None),
     ("ftp://x.io", None), ("x.io", None), ("https://x.io?a", "x.io"), ("https://x.io#f", "x.io")],
)
def test_url_host(url, host):
    assert V.url_host(url) == host


# --------------------------------------------------------------------------------------
# list parameters
# --------------------------------------------------------------------------------------


class TestListParams:
    @pytest.mark.parametrize(
        "query, limit",
        [
            ("", 50), ("limit=10", 10), ("limit=10abc", 10), ("limit=1", 1), ("limit=100", 100), ("limit=101", 100),
            ("limit=200", 100), ("limit=0", 50), ("limit=-5", 50), ("limit=abc", 50), ("limit=", 50),
            ("limit=%2B7", 7), ("limit=+7", 50), ("limit=%2010", 50), ("limit=" + "9" * 5000, 100), ("limit[]=5", 50),
            ("limit=5&limit=7", 7), ("limit=٣", 50),
        ],
    )
    def test_limit(self, query, limit):
        assert V.parse_list_params(query)[0] == limit
        assert V.parse_executions_limit(query) == limit

    @pytest.mark.parametrize(
        "query, offset",
        [
            ("", 0), ("offset=1", 1), ("offset=5x", 5), ("offset=-1", 0), ("offset=abc", 0), ("offset=", 0),
            ("offset=1000000", 1000000), ("offset=" + "9" * 40, 10**18),
        ],
    )
    def test_offset(self, query, offset):
        assert V.parse_list_params(query)[1] == offset

    def test_offset_stays_inside_bigint(self):
        assert V.parse_list_params("offset=" + "9" * 100)[1] < 2**63

    def test_upstream_examples(self):
        assert V.parse_list_params("limit=2&offset=1") == (2, 1, None, False)
        assert V.parse_list_params("limit=200") == (100, 0, None, False)

    def test_queue_filter(self):
        assert V.parse_list_params("queue=payments") == (50, 0, "payments", True)
        assert V.parse_list_params("queue=") == (50, 0, "", True)
        assert V.parse_list_params("queue") == (50, 0, "", True)
        assert V.parse_list_params("queue=none") == (50, 0, V.NO_QUEUE, True)
        assert V.parse_list_params("queue=a%20b&limit=3") == (3, 0, "a b", True)

    @pytest.mark.parametrize("query", ["queue=%00", "queue[]=a", "queue[x]=a"])
    def test_unusable_queue_filter_is_400(self, query):
        with pytest.raises(E.BadRequest):
            V.parse_list_params(query)

    def test_executions_limit_default(self):
        assert V.parse_executions_limit("") == 50
        assert V.parse_executions_limit("offset=3") == 50


# --------------------------------------------------------------------------------------
# errors.py bodies
# --------------------------------------------------------------------------------------


class TestErrorBodies:
    def test_controller_error(self):
        err = E.ControllerError(400, "invalid_params", "queue parameter is required", value="x")
        assert body_of(err) == (400, {"error": {"code": "invalid_params", "message": "queue parameter is required"}})
        assert err.value == "x" and err.status == 400

    def test_invalid_params(self):
        assert body_of(E.InvalidParams("items must be a list")) == (
            400, {"error": {"code": "invalid_params", "message": "items must be a list"}},
        )

    def test_unauthorized_exact_bytes(self):
        response = E.Unauthorized().response()
        assert response.status == 401
        assert response.body == b'{"error":{"code":"unauthorized","message":"Invalid or missing API key"}}'

    def test_not_found_exact_bytes(self):
        response = E.NotFound().response()
        assert response.status == 404
        assert response.body == b'{"error":{"code":"not_found","message":"Resource not found"}}'

    def test_service_unavailable_has_retry_after(self):
        response = E.ServiceUnavailable().response()
        assert response.status == 503
        assert orjson.loads(response.body) == {
            "error": {"code": "service_unavailable", "message": "Server is busy, please retry"}
        }
        assert response.headers == [(b"retry-after", b"5")]
        assert E.ServiceUnavailable(retry_after=2).response().headers == [(b"retry-after", b"2")]

    def test_framework_errors(self):
        assert body_of(E.BadRequest(value=b"{")) == (400, {"errors": {"detail": "Bad Request"}})
        assert body_of(E.FrameworkError(404)) == (404, {"errors": {"detail": "Not Found"}})
        assert body_of(E.FrameworkError(413)) == (413, {"errors": {"detail": "Request Entity Too Large"}})
        assert body_of(E.FrameworkError(418)) == (418, {"errors": {"detail": "I'm a Teapot"}})

    def test_plain_errors(self):
        limited = E.PlainError(429, E.RATE_LIMITED_MESSAGE, headers=[(b"retry-after", b"7")])
        assert body_of(limited) == (429, {"error": "Rate limit exceeded. Try again later."})
        assert limited.response().headers == [(b"retry-after", b"7")]
        assert body_of(E.PlainError(409, E.IN_FLIGHT_MESSAGE)) == (
            409, {"error": "Request in progress. Please wait and retry."},
        )

    def test_sync_validation_error(self):
        err = E.SyncValidationError([{"name": "a", "error": "url: can't be blank"}])
        assert body_of(err) == (422, {"error": {"code": "validation_error", "details": [{"name": "a", "error": "url: can't be blank"}]}})

    def test_every_error_is_an_api_error_with_its_status(self):
        for err, status in [
            (E.InvalidDelay("m", 1), 400), (E.InvalidRunAt(1), 400), (E.Unauthorized(), 401), (E.NotFound(), 404),
            (E.ServiceUnavailable(), 503), (E.ValidationError({}), 422), (E.BadRequest(), 400),
        ]:
            assert isinstance(err, E.ApiError) and err.status == status
            assert err.response().status == status
            assert str(err)
