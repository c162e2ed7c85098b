-- Read load: each request GETs /v1/jobs/<id>, <id> cycling over JOB_IDS (comma separated),
-- with "Authorization: Bearer $TOKEN". Threads start at evenly spaced ids (WRK_THREADS,
-- set by bench/load.py), like append.lua. Extra headers may be given in WRK_HEADERS.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "common.lua")

local ids = {}
for id in string.gmatch(os.getenv("JOB_IDS") or "", "[^,%s]+") do
  table.insert(ids, id)
end
if #ids == 0 then error("get_job.lua: JOB_IDS is empty") end
local token = os.getenv("TOKEN")
if not token or token == "" then error("get_job.lua: TOKEN is not set") end

local headers = env_headers()
headers["Authorization"] = "Bearer " .. token

local next_index = nil

function request()
  if next_index == nil then
    local n_threads = tonumber(os.getenv("WRK_THREADS") or "1") or 1
    next_index = math.floor(((thread_id or 1) - 1) * #ids / n_threads)
  end
  local id = ids[next_index % #ids + 1]
  next_index = next_index + 1
  return wrk.format("GET", "/v1/jobs/" .. id, headers)
end
