// The seed report's load profile for k6, at a constant arrival rate:
// 70% immediate task creation, 15% delayed creation ("5s"), 15% task list reads.
//
// Driven by bench/ladder.py (one k6 run per rate); by hand:
//
//   BASE_URL=http://127.0.0.1:8080 API_KEY=pk_live_….sk_live_… RATE=500 DURATION=30s \
//     k6 run --summary-export /tmp/k6.json bench/k6/seed_mix.js
//
// Environment (all optional except API_KEY):
//   BASE_URL      server under test (default http://127.0.0.1:8080)
//   API_KEY       bearer key
//   TARGET_URL    delivery target of the created tasks (default http://127.0.0.1:9999/hook)
//   RATE          iterations (= requests) per second (default 25, the seed's default)
//   DURATION      k6 duration string (default 30s)
//   PRE_VUS       preAllocatedVUs (default max(10, RATE/10))
//   MAX_VUS       maxVUs (default max(50, RATE))
//   P95_MS        p95 threshold in ms (default 2000, the seed's)
//   ERROR_RATE    failed-request threshold (default 0.05, the seed's)
//   MIX           "seed" (default), "create" (immediate creates only) or "list" (lists only)
//   VUS           when set: a closed loop of that many VUs (constant-vus) instead of RATE
//
// Besides k6's own metrics it records:
//   tasks_created      counter of 202 answers to creates (the seed table's tasks/s)
//   status_2xx/4xx/5xx counters by status class (status 0 = transport error counts as 5xx)
//   latency_503        trend of the duration of 503 answers (overload runs)
//   latency_ok         trend of the duration of 2xx answers
//   retry_after_503    rate of 503 answers that carried a Retry-After header
// and every request is tagged kind=immediate|delayed|list.

import http from 'k6/http';
import exec from 'k6/execution';
import { check } from 'k6';
import { Counter, Rate, Trend } from 'k6/metrics';

const BASE_URL = __ENV.BASE_URL || 'http://127.0.0.1:8080';
const API_KEY = __ENV.API_KEY || '';
const TARGET_URL = __ENV.TARGET_URL || 'http://127.0.0.1:9999/hook';
const RATE = parseInt(__ENV.RATE || '25', 10);
const DURATION = __ENV.DURATION || '30s';
const PRE_VUS = parseInt(__ENV.PRE_VUS || String(Math.max(10, Math.ceil(RATE / 10))), 10);
const MAX_VUS = parseInt(__ENV.MAX_VUS || String(Math.max(50, RATE)), 10);
const P95_MS = parseInt(__ENV.P95_MS || '2000', 10);
const ERROR_RATE = parseFloat(__ENV.ERROR_RATE || '0.05');
const MIX = __ENV.MIX || 'seed';

// VUS set: a closed loop instead (constant-vus: VUS connections each sending its next request as
// soon as the previous one is answered), for pressing a server with many requests in flight.
const VUS = parseInt(__ENV.VUS || '0', 10);
const scenario = VUS > 0
  ? { executor: 'constant-vus', vus: VUS, duration: DURATION }
  : {
    executor: 'constant-arrival-rate',
    rate: RATE,
    timeUnit: '1s',
    duration: DURATION,
    preAllocatedVUs: PRE_VUS,
    maxVUs: MAX_VUS,
  };

export const options = {
  discardResponseBodies: true,
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)'],
  scenarios: { seed_mix: scenario },
  thresholds: {
    http_req_duration: [`p(95)<${P95_MS}`],
    http_req_failed: [`rate<${ERROR_RATE}`],
  },
};

const tasksCreated = new Counter('tasks_created');
const status2xx = new Counter('status_2xx');
const status4xx = new Counter('status_4xx');
const status5xx = new Counter('status_5xx');
const latency503 = new Trend('latency_503', true);
const latencyOk = new Trend('latency_ok', true);
const retryAfter503 = new Rate('retry_after_503');

const headers = {
  Authorization: `Bearer ${API_KEY}`,
  'Content-Type': 'application/json',
};
const immediate = JSON.stringify({ url: TARGET_URL, method: 'GET', retry_attempts: 1, timeout_ms: 10000 });
const delayed = JSON.stringify({ url: TARGET_URL, method: 'POST', body: '{}', delay: '5s' });

// The same fixed 20-slot pattern as bench/wrk/seed_mix.lua (14 immediate, 3 delayed, 3 list),
// indexed by the iteration's number in the whole test, so the mix is exact and k6 spends no
// random numbers on it.
const PATTERN = [1, 1, 2, 1, 1, 3, 1, 1, 1, 2, 1, 1, 3, 1, 1, 1, 2, 1, 3, 1];

function record(res, isCreate) {
  const s = res.status;
  if (s >= 200 && s < 300) {
    status2xx.add(1);
    latencyOk.add(res.timings.duration);
    if (isCreate && s === 202) {
      tasksCreated.add(1);
    }
  } else if (s >= 400 && s < 500) {
    status4xx.add(1);
  } else {
    status5xx.add(1);
  }
  if (s === 503) {
    latency503.add(res.timings.duration);
    retryAfter503.add(res.headers['Retry-After'] !== undefined);
  }
}

export default function () {
  let kind;
  if (MIX === 'create') {
    kind = 1;
  } else if (MIX === 'list') {
    kind = 3;
  } else {
    kind = PATTERN[exec.scenario.iterationInTest % PATTERN.length];
  }
  let res;
  if (kind === 1) {
    res = http.post(`${BASE_URL}/api/v1/tasks`, immediate, { headers, tags: { kind: 'immediate' } });
    check(res, { 'create 202': (r) => r.status === 202 });
    record(res, true);
  } else if (kind === 2) {
    res = http.post(`${BASE_URL}/api/v1/tasks`, delayed, { headers, tags: { kind: 'delayed' } });
    check(res, { 'create 202': (r) => r.status === 202 });
    record(res, true);
  } else {
    res = http.get(`${BASE_URL}/api/v1/tasks?limit=20`, { headers, tags: { kind: 'list' } });
    check(res, { 'list 200': (r) => r.status === 200 });
    record(res, false);
  }
}
