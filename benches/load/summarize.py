#!/usr/bin/env python3
"""Turns the raw results of benches/load.sh into the Markdown tables it prints.

Input: a TSV file with lines `scenario target round metric value`.
Every cell is the median over the rounds and the main table's ratios are of
medians; the round-by-round table and the token-swap scenario pair the runs
within each round instead (see `paired`).
"""
import statistics
import sys
from collections import defaultdict

RATE_METRICS = {"rps": "req/s", "gibps": "GiB/s"}
LAT_METRICS = {"p50_ms": "p50 ms", "p99_ms": "p99 ms", "mean_ms": "mean ms"}
# Proxy CPU time per request: a cost, so its ratio reads like a latency's (lower is better).
COST_METRICS = {"cpu_us_per_req": "CPU µs/req"}


def fmt(v, metric):
    if v is None:
        return "–"
    if metric == "rps":
        return f"{v:,.0f}"
    if metric == "gibps":
        return f"{v:.2f}"
    if metric.endswith("_kib"):
        return f"{v / 1024:.1f}"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def ratio(a, b):
    return f"{a / b:.2f}×" if a is not None and b else "–"


def main():
    data = defaultdict(list)
    by_round = defaultdict(lambda: defaultdict(list))
    order = []
    for line in open(sys.argv[1]):
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 5:
            continue
        scenario, target, _round, metric, value = parts
        try:
            v = float(value)
        except ValueError:
            continue
        if scenario not in order:
            order.append(scenario)
        data[(scenario, target, metric)].append(v)
        by_round[(scenario, target, metric)][_round].append(v)

    def med(s, t, m):
        vals = data.get((s, t, m))
        return statistics.median(vals) if vals else None

    def rounds(s, t, m):
        return len(data.get((s, t, m), []))

    def paired(s, b, a, m):
        """Per round, the mean of b's runs over the mean of a's: the ratio within a
        round, where both ran minutes apart at most, not across the whole run."""
        rb, ra = by_round.get((s, b, m), {}), by_round.get((s, a, m), {})
        return [statistics.mean(rb[r]) / statistics.mean(ra[r]) for r in rb if ra.get(r) and statistics.mean(ra[r])]

    print("### Throughput and latency (medians)\n")
    print("| scenario | metric | direct | nginx | ims-proxy | ims/nginx | ims/direct | nginx added | ims added |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s in order:
        if s.startswith("mem") or s.startswith("swap"):
            continue
        for m, label in list(RATE_METRICS.items()) + list(LAT_METRICS.items()) + list(COST_METRICS.items()):
            d, n, i = med(s, "direct", m), med(s, "nginx", m), med(s, "ims", m)
            if d is None and n is None and i is None:
                continue
            added_n = f"{n - d:+.3f}" if m in LAT_METRICS and n is not None and d is not None else ""
            added_i = f"{i - d:+.3f}" if m in LAT_METRICS and i is not None and d is not None else ""
            k = max(rounds(s, t, m) for t in ("direct", "nginx", "ims"))
            print(
                f"| {s} (n={k}) | {label} | {fmt(d, m)} | {fmt(n, m)} | {fmt(i, m)} | "
                f"{ratio(i, n)} | {ratio(i, d)} | {added_n} | {added_i} |"
            )
        errs = [med(s, t, "errors") for t in ("direct", "nginx", "ims")]
        if any(e for e in errs if e):
            print(f"| {s} | errors | {errs[0]} | {errs[1]} | {errs[2]} | | | | |")

    print("\n### ims-proxy / nginx round by round (throughput)\n")
    print("| scenario | per round | median | rounds ims-proxy ahead |")
    print("| --- | --- | ---: | ---: |")
    for s in order:
        if " at " in s:  # a fixed rate: both serve the rate asked for
            continue
        for m in RATE_METRICS:
            r = paired(s, "ims", "nginx", m)
            if r:
                each = ", ".join(f"{x:.3f}" for x in r)
                ahead = sum(x > 1 for x in r)
                print(f"| {s} | {each} | {statistics.median(r):.3f}× | {ahead} of {len(r)} |")

    swap = [s for s in order if s.startswith("swap")]
    if swap:
        print("\n### Token swap every second (ims-proxy against itself)\n")
        print(
            "Ratios are paired within each round (the mean of its swap runs over the"
            " mean of its runs without), then the median over the rounds.\n"
        )
        print(
            "| scenario | no swaps req/s | swap/s req/s | swap / no swap | per round "
            "| CPU µs/req, swap / no swap | tokens issued per swap run |"
        )
        print("| --- | ---: | ---: | ---: | --- | ---: | ---: |")
        for s in swap:
            # ims-still: the same process as ims-swap, without swaps (older reports: ims).
            still = "ims-still" if data.get((s, "ims-still", "rps")) else "ims"
            a, b = med(s, still, "rps"), med(s, "ims-swap", "rps")
            rps = paired(s, "ims-swap", still, "rps")
            cpu = paired(s, "ims-swap", still, "cpu_us_per_req")
            each = ", ".join(f"{r:.3f}" for r in rps)
            mid = f"{statistics.median(rps):.3f}×" if rps else "–"
            cost = f"{statistics.median(cpu):.3f}×" if cpu else "–"
            swaps = med(s, "ims-swap", "swaps")
            print(f"| {s} | {fmt(a, 'rps')} | {fmt(b, 'rps')} | {mid} | {each} | {cost} | {'–' if swaps is None else f'{swaps:.0f}'} |")

    print("\n### Memory (MiB; ims-proxy RSS, nginx master+workers summed RSS and PSS; peak = max over the rounds)\n")
    print("| when | ims-proxy RSS | nginx RSS | nginx PSS | ims/nginx (RSS) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    mem_rows = [(s, m) for s in order for m in ("peak_rss_kib",) if data.get((s, "ims", m))]
    for s, m in mem_rows:
        vals_i = data.get((s, "ims", "peak_rss_kib"))
        vals_n = data.get((s, "nginx", "peak_rss_kib"))
        vals_p = data.get((s, "nginx", "peak_pss_kib"))
        i = max(vals_i) if vals_i else None
        n = max(vals_n) if vals_n else None
        p = max(vals_p) if vals_p else None
        print(f"| {s} | {fmt(i, 'x_kib')} | {fmt(n, 'x_kib')} | {fmt(p, 'x_kib')} | {ratio(i, n)} |")


if __name__ == "__main__":
    main()
