-- Generic wrk script: one fixed request taken from environment variables
--   WRK_METHOD (default GET), WRK_BODY (default none),
--   WRK_HEADERS ("Name: value" lines separated by newlines).
-- Reports through common.lua's done().
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "common.lua")

wrk.method = os.getenv("WRK_METHOD") or "GET"
wrk.body = os.getenv("WRK_BODY")
for name, value in pairs(env_headers()) do wrk.headers[name] = value end
