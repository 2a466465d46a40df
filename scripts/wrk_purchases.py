"""wrk driving purchases: each request a given (sale, token) pair's purchase,
counted by status, and the invariants such a run must keep. bench.py and
bench_external.py use it; wrk is from Debian's packages (apt-get install wrk).

wrk is a C load generator: at 64 connections it uses a tenth of the CPU per
request that loadtest.py's Python client does, so on a machine whose cores
the client shares with the server and PostgreSQL it leaves them the server's.
"""

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

# wrk: each thread walks its share of (sale, token) pairs, one distinct user's
# first purchase per request, and stops when its share runs out. It counts
# the answers by status (wrk itself only counts "not 2xx/3xx").
WRK_LUA = r'''
local pairs_file = os.getenv("WRK_PAIRS")
local threads = {}
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
  table.insert(threads, thread)
end
function init(args)
  statuses = {}
  items = {}
  local n = 0
  local stride = tonumber(os.getenv("WRK_THREADS"))
  for line in io.lines(pairs_file) do
    if n % stride == id - 1 then
      local sale, token = line:match("(%S+) (%S+)")
      items[#items + 1] = wrk.format("POST", "/api/flash-sales/" .. sale .. "/purchase",
        {["Authorization"] = "Bearer " .. token, ["Content-Length"] = "0"})
    end
    n = n + 1
  end
  next_item = 0
  cycle = os.getenv("WRK_CYCLE") == "1"
end
function request()
  next_item = next_item + 1
  if next_item > #items then
    if cycle then next_item = 1 else wrk.thread:stop() return items[#items] end
  end
  return items[next_item]
end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    local s = thread:get("statuses")
    for code, n in pairs(s) do counts[tostring(code)] = (counts[tostring(code)] or 0) + n end
  end
  local parts = {}
  for code, n in pairs(counts) do parts[#parts + 1] = string.format('"%s": %d', code, n) end
  io.write(string.format('WRK_RESULT {"statuses": {%s}, "requests": %d, "duration_us": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d, "status": %d}, ' ..
    '"p50_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f}\n',
    table.concat(parts, ", "), summary.requests, summary.duration,
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout,
    summary.errors.status, latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
'''


def run_wrk(base_url, pairs, workdir, connections, duration, cycle=False, threads=2):
    wrk = shutil.which('wrk')
    if not wrk:
        raise SystemExit('wrk is missing (apt-get install wrk)')
    lua = Path(workdir) / 'purchase.lua'
    lua.write_text(WRK_LUA)
    pairs_file = Path(workdir) / f'pairs-{uuid.uuid4().hex[:6]}.txt'
    pairs_file.write_text(''.join(f'{sale} {token}\n' for sale, token in pairs))
    env = dict(os.environ, WRK_PAIRS=str(pairs_file), WRK_THREADS=str(threads), WRK_CYCLE='1' if cycle else '0')
    done = subprocess.run([wrk, '-t', str(threads), '-c', str(connections), '-d', f'{duration}s', '--timeout', '10s',
                           '-s', str(lua), base_url], env=env, capture_output=True, text=True,
                          timeout=duration + 60)
    line = next((x for x in done.stdout.splitlines() if x.startswith('WRK_RESULT ')), None)
    if line is None:
        raise SystemExit(f'wrk printed no result ({done.returncode}):\n{done.stdout}\n{done.stderr}')
    result = json.loads(line.split(' ', 1)[1])
    seconds = result['duration_us'] / 1e6
    result['rate'] = round(sum(result['statuses'].values()) / seconds, 1)
    return result


def purchases_held(states, statuses, connections, bought=('201',)):
    """The invariants of a wrk purchase run, from its sales read back
    (loadtest.read_database) and wrk's answers by status: in every sale
    remaining + orders == total and no user twice; no answer but a purchase
    (`bought`: the reference app answers one 200); and every purchase
    answered is an order. wrk stops at its deadline without reading the
    answers in flight, so up to `connections` orders may have no answer
    counted, never the other way round."""
    answered = sum(statuses.get(code, 0) for code in bought)
    orders = sum(s['orders'] for s in states)
    return (all(s['remaining'] + s['orders'] == s['total'] and s['duplicates'] == 0 for s in states)
            and 0 <= orders - answered <= connections and set(statuses) <= set(bought))
