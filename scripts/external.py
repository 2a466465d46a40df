"""The load generators people use, driven by the benchmark (scripts/bench.py):
wrk (from Debian's packages: apt-get install wrk) and Artillery (pinned in
scripts/bench-tools: PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix
scripts/bench-tools), and the invariants a wrk purchase run must keep.

wrk is a C load generator: at 64 connections it uses a fraction of the CPU per
request that the Python client (scripts/loadclient.py) does, so on a machine
whose cores the client shares with the server and PostgreSQL it leaves them
the server's.
"""

import csv
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import loadclient

ARTILLERY = Path(__file__).resolve().parent / 'bench-tools' / 'node_modules' / '.bin' / 'artillery'

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


def wrk_binary():
    wrk = shutil.which('wrk')
    if not wrk:
        raise SystemExit('wrk is missing (apt-get install wrk)')
    return wrk


def version(client):
    """The client's name and version, for a report's header."""
    if client == 'wrk':
        done = subprocess.run([wrk_binary(), '-v'], capture_output=True, text=True)
        found = re.search(r'wrk (\S+)', done.stdout + done.stderr)
        return f'wrk {found.group(1) if found else "?"}'
    if client == 'artillery':
        found = json.loads((ARTILLERY.parent.parent / 'artillery' / 'package.json').read_text())['version'] \
            if ARTILLERY.exists() else '(not installed)'
        return f'Artillery {found}'
    return client


def run_wrk(base_url, pairs, workdir, connections, duration, cycle=False, threads=2):
    """`duration` seconds of purchases, one (sale, token) pair each (`cycle`:
    round again when they run out); the answers counted by status."""
    wrk = wrk_binary()
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
    (scenarios.read_database) and wrk's answers by status: in every sale
    remaining + orders == total and no user twice; no answer but a purchase
    (`bought`: the reference app answers one 200); and every purchase
    answered is an order. wrk stops at its deadline without reading the
    answers in flight, so up to `connections` orders may have no answer
    counted, never the other way round."""
    answered = sum(statuses.get(code, 0) for code in bought)
    orders = sum(s['orders'] for s in states)
    return (all(s['remaining'] + s['orders'] == s['total'] and s['duplicates'] == 0 for s in states)
            and 0 <= orders - answered <= connections and set(statuses) <= set(bought))


# wrk: GETs of one path, or of random sale ids (the benchmark's health and
# floods runs); answers counted by status.
WRK_GET_LUA = r'''
local mode = os.getenv("WRK_MODE")
local path = os.getenv("WRK_PATH")
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  statuses = {}
  math.randomseed(os.time() * 1000 + math.floor(os.clock() * 1000000))
end
local function hex(n) local s = "" for _ = 1, n do s = s .. string.format("%x", math.random(0, 15)) end return s end
function request()
  if mode == "random-id" then
    return wrk.format("GET", "/api/flash-sales/" .. hex(8) .. "-" .. hex(4) .. "-4" .. hex(3) .. "-a" .. hex(3) .. "-" .. hex(12))
  end
  return wrk.format("GET", path)
end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    for code, n in pairs(thread:get("statuses")) do counts[tostring(code)] = (counts[tostring(code)] or 0) + n end
  end
  local parts = {}
  for code, n in pairs(counts) do parts[#parts + 1] = string.format('"%s": %d', code, n) end
  io.write(string.format('WRK_RESULT {"statuses": {%s}, "duration_us": %d, "p50_ms": %.3f, "p99_ms": %.3f}\n',
    table.concat(parts, ", "), summary.duration, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
'''


def wrk_get(base_url, mode, path, connections, seconds, workdir):
    """Start wrk GETting `path` (mode 'path') or random sale ids ('random-id'); returns the process."""
    lua = Path(workdir) / f'get-{uuid.uuid4().hex[:8]}.lua'  # one each: a wrk starting reads its file
    lua.write_text(WRK_GET_LUA)
    env = dict(os.environ, WRK_MODE=mode, WRK_PATH=path)
    return subprocess.Popen([wrk_binary(), '-t', '1', '-c', str(connections), '-d', f'{seconds}s',
                             '--timeout', '10s', '-s', str(lua), base_url],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wrk_result(proc):
    out, err = proc.communicate(timeout=120)
    line = next((x for x in out.splitlines() if x.startswith('WRK_RESULT ')), None)
    if line is None:
        raise SystemExit(f'wrk printed no result ({proc.returncode}, {proc.args}):\n{out}\n{err}')
    result = json.loads(line.split(' ', 1)[1])
    result['rate'] = sum(result['statuses'].values()) / (result['duration_us'] / 1e6)
    return result


def artillery_script(target, rate, duration):
    """A crowd as an Artillery script (JSON is YAML): `rate` arrivals/s for
    `duration` s, each a new virtual user on its own connection posting one
    purchase with a random user's token from data/users.csv."""
    return {
        'config': {
            'target': target,
            'phases': [{'duration': duration, 'arrivalRate': rate}],
            'payload': [
                {'path': './data/users.csv', 'fields': ['email', 'password', 'token'], 'skipHeader': True},
                {'path': './data/flash-sale.csv', 'fields': ['flash_sale_id'], 'skipHeader': True},
            ],
            'defaults': {'headers': {'Content-Type': 'application/json'}},
        },
        'scenarios': [{
            'name': 'purchase',
            'flow': [{'post': {'url': '/api/flash-sales/{{ flash_sale_id }}/purchase',
                               'headers': {'Authorization': 'Bearer {{ token }}'},
                               'json': {}}}],
        }],
    }


def run_artillery(target, users, sale_id, workdir, rate, duration, script=None):
    """The crowd through Artillery (or a given Artillery script, its CSV
    payloads written into a data/ folder beside a copy of it): its answers
    by status, errors and latency."""
    if not ARTILLERY.exists():
        raise SystemExit(f'{ARTILLERY} is missing: PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix scripts/bench-tools')
    run_dir = Path(tempfile.mkdtemp(prefix='artillery-', dir=workdir))
    (run_dir / 'data').mkdir()
    with open(run_dir / 'data' / 'users.csv', 'w', newline='') as fh:
        out = csv.writer(fh)
        out.writerow(['email', 'password', 'token'])
        for u in users:
            out.writerow([u.email, loadclient.USER_PASSWORD, u.token])
    (run_dir / 'data' / 'flash-sale.csv').write_text(f'flash_sale_id\n{sale_id}\n')
    if script:
        script_path = run_dir / Path(script).name
        shutil.copyfile(script, script_path)
    else:
        script_path = run_dir / 'crowd.json'
        script_path.write_text(json.dumps(artillery_script(target, rate, duration), indent=2))
    report = run_dir / 'report.json'
    env = dict(os.environ, ARTILLERY_DISABLE_TELEMETRY='true', DO_NOT_TRACK='1')
    done = subprocess.run([str(ARTILLERY), 'run', '--target', target, '--output', str(report), str(script_path)],
                          env=env, capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or not report.exists():
        raise SystemExit(f'artillery failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}')
    aggregate = json.loads(report.read_text())['aggregate']
    counters = aggregate.get('counters', {})
    summary = aggregate.get('summaries', {}).get('http.response_time', {})
    codes = {k.rsplit('.', 1)[1]: v for k, v in counters.items() if k.startswith('http.codes.')}
    errors = {k.split('.', 1)[1]: v for k, v in counters.items() if k.startswith('errors.')}
    return {'codes': codes, 'errors': errors, 'requests': counters.get('http.requests', 0),
            'p50_ms': summary.get('median'), 'p99_ms': summary.get('p99'), 'max_ms': summary.get('max')}
