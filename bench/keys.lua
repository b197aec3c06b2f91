-- wrk script: spread requests over keys <path>0 .. <path>N-1, in order, wrapping around.
--
--   wrk ... -s bench/keys.lua http://127.0.0.1:8787 -- PATH N [METHOD] [BODY_BYTES] [QUERY] [OFFSET] [HEADER]
--
-- PATH is the path before the key number (e.g. /v1/cache/l1:), QUERY a query string
-- without '?', OFFSET the first key (so a run can start where its warm-up did not go),
-- HEADER one "Name: value" line (e.g. an Authorization header). The requests are built
-- once in init(): request() only hands them out, so wrk's Lua costs almost nothing.
-- With several wrk threads each thread walks the same keys from the same offset.

local requests = {}
local count = 0
local nxt = 1

function init(args)
  local path = args[1]
  local n = tonumber(args[2])
  local method = args[3] or "GET"
  local size = tonumber(args[4] or "0")
  local query = args[5] or ""
  local offset = tonumber(args[6] or "0")
  local header = args[7] or ""
  local body = nil
  local headers = {}
  if size > 0 then
    body = string.rep("x", size)
    headers["Content-Type"] = "application/octet-stream"
  end
  if header ~= "" then
    local name, value = header:match("^([^:]+):%s*(.*)$")
    headers[name] = value
  end
  if query ~= "" then query = "?" .. query end
  for i = 0, n - 1 do
    local key = (i + offset) % n
    requests[i + 1] = wrk.format(method, path .. key .. query, headers, body)
  end
  count = n
end

function request()
  local r = requests[nxt]
  nxt = nxt + 1
  if nxt > count then nxt = 1 end
  return r
end
