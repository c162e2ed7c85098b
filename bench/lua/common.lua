-- Shared by request.lua and append.lua (loaded with dofile).
-- Counts response statuses per thread and, in done(), prints one line
--   WRK_JSON {...}
-- with throughput, latency percentiles (ms) and status counts for bench/load.py.

local threads = {}
local thread_count = 0

-- Parse WRK_HEADERS: "Name: value" entries separated by newlines.
function env_headers()
  local headers = {}
  for line in string.gmatch(os.getenv("WRK_HEADERS") or "", "[^\n]+") do
    local name, value = string.match(line, "^%s*([^:]+):%s*(.-)%s*$")
    if name then headers[name] = value end
  end
  return headers
end

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_id", thread_count)
  table.insert(threads, thread)
end

statuses = {}

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local counts = {}
  local non_2xx = 0
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses") or {}) do
      counts[status] = (counts[status] or 0) + count
      if status < 200 or status > 299 then non_2xx = non_2xx + count end
    end
  end
  local parts = {}
  for status, count in pairs(counts) do
    table.insert(parts, string.format('"%d":%d', status, count))
  end
  local e = summary.errors
  local seconds = summary.duration / 1e6
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_s":%.6f,"requests_per_s":%.3f,'
      .. '"latency_p50_ms":%.3f,"latency_p99_ms":%.3f,"latency_mean_ms":%.3f,'
      .. '"latency_max_ms":%.3f,"non_2xx":%d,"status_counts":{%s},'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\n',
    summary.requests, seconds, summary.requests / seconds,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency.mean / 1000, latency.max / 1000, non_2xx, table.concat(parts, ","),
    e.connect, e.read, e.write, e.status, e.timeout))
end
