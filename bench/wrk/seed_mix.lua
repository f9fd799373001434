-- The seed report's load profile for wrk: 70% immediate task creation, 15% delayed
-- creation ("5s"), 15% task list reads. The API key comes from the RUNLATER_KEY
-- environment variable; the delivery target from RUNLATER_TARGET (never contacted
-- during an API-only run: executors are off).
--
--   RUNLATER_KEY=pk_live_….sk_live_… wrk -t2 -c64 -d30s -s bench/wrk/seed_mix.lua http://127.0.0.1:8080

local key = os.getenv("RUNLATER_KEY") or ""
local target = os.getenv("RUNLATER_TARGET") or "http://127.0.0.1:9999/hook"

local auth = { ["authorization"] = "Bearer " .. key, ["content-type"] = "application/json" }
local immediate = '{"url":"' .. target .. '","method":"GET","retry_attempts":1,"timeout_ms":10000}'
local delayed = '{"url":"' .. target .. '","method":"POST","body":"{}","delay":"5s"}'

local counter = 0
-- A fixed 20-slot pattern (14 immediate, 3 delayed, 3 list) keeps the mix exact and
-- costs no random numbers per request.
local pattern = { 1, 1, 2, 1, 1, 3, 1, 1, 1, 2, 1, 1, 3, 1, 1, 1, 2, 1, 3, 1 }

request = function()
   counter = counter + 1
   local kind = pattern[(counter % 20) + 1]
   if kind == 1 then
      return wrk.format("POST", "/api/v1/tasks", auth, immediate)
   elseif kind == 2 then
      return wrk.format("POST", "/api/v1/tasks", auth, delayed)
   end
   return wrk.format("GET", "/api/v1/tasks?limit=20", auth, nil)
end

local non2xx = 0
response = function(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   end
end

done = function(summary, latency, requests)
   local p = function(q) return latency:percentile(q) / 1000.0 end
   io.write(string.format("RESULT requests=%d duration_s=%.3f rps=%.1f p50_ms=%.3f p95_ms=%.3f p99_ms=%.3f errors=%d status_errors=%d\n",
      summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
      p(50), p(95), p(99),
      summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
      summary.errors.status))
end
