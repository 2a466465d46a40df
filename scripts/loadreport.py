"""The load tool's reports: the text summary it prints and the HTML page with
charts (inline SVG, no external assets) that --html writes, both from the
result dict that --json writes, and the latency figures in them. Standard
library only."""

import html
import json
import math


def percentile(sorted_values, p):
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_summary(latencies):
    values = sorted(latencies)
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    return {
        'p50': ms(percentile(values, 50)),
        'p90': ms(percentile(values, 90)),
        'p99': ms(percentile(values, 99)),
        'max': ms(values[-1] if values else None),
        'mean': ms(sum(values) / len(values) if values else None),
    }


def deliver(text, result, json_file=None, html_file=None):
    """Print a run's report; write its result as JSON and as an HTML page where asked."""
    print(text)
    if json_file:
        with open(json_file, 'w') as fh:
            json.dump(result, fh, indent=2, default=str)
    if html_file:
        with open(html_file, 'w') as fh:
            fh.write(html_report(result))


def format_report(result):
    lines = []
    p = result['params']
    lines.append(f'scenario {result["scenario"]} against {result["base_url"]} ({result["model"]} model)')
    if result['model'] == 'open':
        lines.append(f'  offered {p["rate"]:g} req/s for {p["duration"]:g} s = {result["requests"]} requests, '
                     f'{p["users"]} users, stock {p["stock"]}')
    else:
        lines.append(f'  {p["connections"]} connections, {result["requests"]} requests, {p["users"]} users, '
                     f'stock {p["stock"]}')
    lines.append(f'  achieved {result["achieved_rate"]} req/s started; {result["answered"]} answered in '
                 f'{result["elapsed_s"]} s = {result["answered_rate"]} answers/s')
    lines.append('answers:')
    for label, n in result['by_code'].items():
        lines.append(f'  {n:>8}  {label}')
    lines.append('by status: ' + ', '.join(f'{k}: {v}' for k, v in result['by_status'].items()))
    lat = result['latency_ms']
    lines.append(f'latency ms: p50 {lat["p50"]}  p90 {lat["p90"]}  p99 {lat["p99"]}  max {lat["max"]}'
                 + ('  (from the scheduled start)' if result['model'] == 'open' else ''))
    lines.append(f'errors: {sum(result["errors"].values())} (timeouts {result["timeouts"]})'
                 + (f' {result["errors"]}' if result['errors'] else ''))
    c = result['connections']
    lines.append(f'connections: {c["initial"]} opened up front, peak {c["peak_open"]} open '
                 f'({c["opened_beyond_initial"]} beyond the initial ones, cap {c["max"]}), '
                 f'{c["waited_for_connection"]} requests waited for a free one, '
                 f'{c["discarded"]} closed after a timeout, an error or "Connection: close"')
    w = result.get('watchers')
    if w:
        lines.append(f'watchers: {w["watchers"]} polling every {w["interval_s"]:g} s: {w["answered"]} answers '
                     f'{w["by_status"]}, errors {w["errors"] or 0}, p99 {w["latency_ms"]["p99"]} ms')
    cl = result['client']
    lines.append(f'client: {cl["cpu_cores_used"]} CPU cores used, fell behind schedule by at most '
                 f'{cl["max_schedule_lag_ms"]} ms')
    if cl['cpu_cores_used'] and cl['cpu_cores_used'] > 0.9:
        lines.append('  warning: the client used a whole core; it may be the bottleneck')
    inv = result['invariants']
    lines.append(f'sale {result["sale"]["id"]}: total {inv["total"]}, remaining {inv["remaining"]}, '
                 f'orders {inv["orders"]}, 201s received {inv["created_201"]}')
    for c in inv['checks']:
        mark = {True: 'ok  ', False: 'FAIL', None: '??  '}[c['ok']]
        lines.append(f'  {mark} {c["name"]}: {c["detail"]}')
    lines.append(f'verdict: {inv["verdict"].upper()}')
    return '\n'.join(lines)


PALETTE = ['#2e7d32', '#1565c0', '#ef6c00', '#6a1b9a', '#c62828', '#00838f', '#9e9d24', '#5d4037', '#455a64']


def _label_colour(label, order):
    if label == '201':
        return PALETTE[0]
    if label == 'timeout' or label.startswith('error:') or label.startswith('5'):
        return PALETTE[4] if label == 'timeout' else '#b71c1c'
    return PALETTE[1 + order.index(label) % 7] if label in order else PALETTE[-1]


def _svg_axes(width, height, pad, y_max, y_label, x_max, x_label):
    parts = [f'<rect x="{pad}" y="10" width="{width - pad - 10}" height="{height - pad - 10}" '
             'fill="none" stroke="#999"/>']
    for k in range(5):
        v = y_max * k / 4
        y = height - pad - (height - pad - 10) * k / 4
        parts.append(f'<line x1="{pad}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{pad - 4}" y="{y + 4:.1f}" text-anchor="end">'
                     f'{f"{v:,.0f}" if y_max >= 100 else f"{v:.3g}"}</text>')
    for k in range(6):
        v = x_max * k / 5
        x = pad + (width - pad - 10) * k / 5
        parts.append(f'<text x="{x:.1f}" y="{height - pad + 16}" text-anchor="middle">{v:.3g}</text>')
    parts.append(f'<text x="{(width + pad) / 2}" y="{height - 4}" text-anchor="middle">{x_label}</text>')
    parts.append(f'<text x="12" y="{(height - pad) / 2}" transform="rotate(-90 12 {(height - pad) / 2})" '
                 f'text-anchor="middle">{y_label}</text>')
    return parts


def latency_svg(points, width=760, height=260, pad=56):
    if not points:
        return '<p>no data</p>'
    width_s = points[0]['width']
    x_max = (len(points)) * width_s
    y_max = max([p['p99_ms'] or 0 for p in points] + [1]) * 1.1
    sx = lambda t: pad + (width - pad - 10) * t / x_max  # noqa: E731
    sy = lambda v: height - pad - (height - pad - 10) * v / y_max  # noqa: E731
    parts = _svg_axes(width, height, pad, y_max, 'latency ms', x_max, 'seconds into the run (scheduled start)')
    for key, colour in (('p50_ms', '#1565c0'), ('p99_ms', '#c62828')):
        pts = ' '.join(f'{sx(p["t"] + width_s / 2):.1f},{sy(p[key]):.1f}' for p in points if p[key] is not None)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for p in points:
            if p[key] is not None:
                parts.append(f'<circle cx="{sx(p["t"] + width_s / 2):.1f}" cy="{sy(p[key]):.1f}" r="2.5" '
                             f'fill="{colour}"><title>{p["t"]:g} s: {key[:3]} {p[key]} ms</title></circle>')
    parts.append(f'<text x="{width - 120}" y="28" fill="#1565c0">p50</text>'
                 f'<text x="{width - 80}" y="28" fill="#c62828">p99</text>')
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" ' \
           f'font-family="sans-serif" font-size="11">{"".join(parts)}</svg>'


def counts_svg(points, labels, width=760, height=260, pad=56):
    if not points:
        return '<p>no data</p>'
    width_s = points[0]['width']
    x_max = len(points) * width_s
    y_max = max([sum(p['counts'].values()) / width_s for p in points] + [1]) * 1.1
    sx = lambda t: pad + (width - pad - 10) * t / x_max  # noqa: E731
    sy = lambda v: (height - pad - 10) * v / y_max  # noqa: E731
    parts = _svg_axes(width, height, pad, y_max, 'answers per second', x_max,
                      'seconds into the run (scheduled start)')
    bar_w = max(1.0, sx(width_s) - sx(0) - 1)
    for p in points:
        base = height - pad
        for label in labels:
            n = p['counts'].get(label, 0)
            if not n:
                continue
            h = sy(n / width_s)
            base -= h
            parts.append(f'<rect x="{sx(p["t"]):.1f}" y="{base:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                         f'fill="{_label_colour(label, labels)}"><title>{p["t"]:g} s: {n} x {html.escape(label)}'
                         '</title></rect>')
    legend = ''.join(
        f'<span style="color:{_label_colour(label, labels)}">&#9632; {html.escape(label)}</span> &nbsp; '
        for label in labels
    )
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" ' \
           f'font-family="sans-serif" font-size="11">{"".join(parts)}</svg><p>{legend}</p>'


def html_report(result):
    labels = list(result['by_code'])
    esc = html.escape
    lat = result['latency_ms']
    inv = result['invariants']
    rows = ''.join(f'<tr><td>{esc(k)}</td><td class="n">{v}</td></tr>' for k, v in result['by_code'].items())
    check_rows = ''.join(
        f'<tr class="{ {True: "ok", False: "fail", None: "unk"}[c["ok"]] }"><td>'
        f'{ {True: "ok", False: "FAIL", None: "??"}[c["ok"]] }</td><td>{esc(c["name"])}</td>'
        f'<td>{esc(c["detail"])}</td></tr>'
        for c in inv['checks']
    )
    width_s = result['timeline'][0]['width'] if result['timeline'] else 1
    return f'''<!doctype html>
<html><head><meta charset="utf-8"><title>flashsale load test: {esc(result["scenario"])}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; max-width: 820px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ddd; padding: 3px 8px; text-align: left; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr.ok td:first-child {{ color: #2e7d32; }} tr.fail td {{ color: #c62828; font-weight: bold; }}
tr.unk td:first-child {{ color: #ef6c00; }}
.verdict {{ font-size: 1.4em; font-weight: bold; }}
</style></head><body>
<h1>flashsale load test: {esc(result["scenario"])}</h1>
<p>{esc(result["base_url"])}, started {esc(result["started_at"])}, {esc(result["model"])} model.
Parameters: {esc(json.dumps(result["params"]))}</p>
<p class="verdict">Verdict: {esc(inv["verdict"].upper())}</p>
<h2>Summary</h2>
<table>
<tr><th>requests</th><td class="n">{result["requests"]}</td></tr>
<tr><th>achieved rate (req/s started)</th><td class="n">{result["achieved_rate"]}</td></tr>
<tr><th>answers/s</th><td class="n">{result["answered_rate"]}</td></tr>
<tr><th>latency p50 / p90 / p99 / max (ms)</th>
<td class="n">{lat["p50"]} / {lat["p90"]} / {lat["p99"]} / {lat["max"]}</td></tr>
<tr><th>errors (timeouts)</th><td class="n">{sum(result["errors"].values())} ({result["timeouts"]})</td></tr>
<tr><th>connections: initial / peak open / requests that waited for one</th>
<td class="n">{result["connections"]["initial"]} / {result["connections"]["peak_open"]} /
{result["connections"]["waited_for_connection"]}</td></tr>
<tr><th>sale: total / remaining / orders</th><td class="n">{inv["total"]} / {inv["remaining"]} /
{inv["orders"]}</td></tr>
</table>
<h2>Answers</h2><table>{rows}</table>
<h2>Latency over time</h2>
<p>Per {width_s:g} s of scheduled start: p50 and p99 in milliseconds.</p>
{latency_svg(result["timeline"])}
<h2>Answers over time</h2>
<p>Per {width_s:g} s of scheduled start, as a rate per second, by status and code.</p>
{counts_svg(result["timeline"], labels)}
<h2>Invariants (read back after the run)</h2>
<table><tr><th></th><th>check</th><th>detail</th></tr>{check_rows}</table>
</body></html>
'''
