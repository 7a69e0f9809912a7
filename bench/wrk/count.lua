-- Counts every answer by status (with one body of each status >= 300), by X-Proxy-Provider,
-- and the 503 proxy_overloaded bodies. A response() hook slows wrk down: used only where these
-- counts are what is measured (bench reliability) or to diagnose a run with errors.
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {}; examples = {}; providers = {}; overloaded = 0 end
function response(status, headers, body)
  local k = tostring(status)
  statuses[k] = (statuses[k] or 0) + 1
  local p = headers["X-Proxy-Provider"] or headers["x-proxy-provider"] or "-"
  providers[p] = (providers[p] or 0) + 1
  if status >= 300 then
    if examples[k] == nil then examples[k] = string.sub(body, 1, 300) end
    if string.find(body, "proxy_overloaded", 1, true) then overloaded = overloaded + 1 end
  end
end
function report_counts()
  for _, t in ipairs(threads) do
    local ex = t:get("examples")
    for k, n in pairs(t:get("statuses")) do
      io.write("BENCH_STATUS " .. k .. " " .. n .. " " .. string.gsub(ex[k] or "", "\n", " ") .. "\n")
    end
    for p, n in pairs(t:get("providers")) do io.write("BENCH_PROVIDER " .. p .. " " .. n .. "\n") end
    io.write("BENCH_OVERLOADED " .. t:get("overloaded") .. "\n")
  end
end
