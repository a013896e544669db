#!/usr/bin/env bash
# User and system CPU time per request of running proxies, in alternating rounds
# of `wrk -c CONNS`: the A/B comparison the PERFORMANCE.md passes quote ("on the
# rig"). Start the rig first (`HOLD=1200 benches/load.sh`), and any variant to
# compare on ports of its own (a copy of the rig's ims.toml with other ports).
#
# Usage: benches/load/cpu_per_request.sh ROUNDS SECONDS CONNS name:port:pid[,pid...] ...
#   e.g. benches/load/cpu_per_request.sh 6 5 32 nginx:18011:PID1,PID2 ims:18021:PID3
# Prints one line per run (req/s, the proxy's user and system µs per request,
# and the whole machine's busy µs per request: proxy, upstream, load generator
# and kernel together, which with every core saturated sets the req/s; all
# from /proc), then the mean of each variant. PATH and KEY are the rig's;
# override with BENCH_PATH and BENCH_KEY. ORDER=abba (two variants A B): each
# round runs A B B A, the next B A A B, so a steady drift weighs on both alike;
# then also each round's req/s ratio B / A and their median.
set -euo pipefail
(($# >= 4)) || { sed -n '2,15p' "$0" >&2; exit 2; }
ROUNDS=$1 SECS=$2 CONNS=$3
shift 3
BENCH_PATH=${BENCH_PATH:-/bench/api/v1/items}
BENCH_KEY=${BENCH_KEY:-load-bench-client-key-0123456789}
TICK=$(getconf CLK_TCK)

# Summed user and system clock ticks of the given pids (all their threads).
ticks() {
    local user=0 sys=0 pid fields
    for pid in "$@"; do
        # Fields 14 and 15 of /proc/PID/stat, counted after the command name's ')'.
        fields=$(sed 's/.*) //' "/proc/$pid/stat")
        read -r -a f <<<"$fields"
        user=$((user + f[11])) sys=$((sys + f[12]))
    done
    echo "$user $sys"
}

# Busy clock ticks of the whole machine (all but idle and iowait).
machine_ticks() {
    awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat
}

ORDER=${ORDER:-}
if [[ $ORDER == abba ]]; then
    (($# == 2)) || { echo "ORDER=abba compares exactly two variants" >&2; exit 2; }
    A=$1 B=$2
fi
declare -A runs rps_sum user_sum sys_sum machine_sum round_rps
ratios=()
for ((round = 1; round <= ROUNDS; round++)); do
    specs=("$@")
    if [[ $ORDER == abba ]]; then
        specs=("$A" "$B" "$B" "$A")
        ((round % 2 == 1)) || specs=("$B" "$A" "$A" "$B")
    fi
    round_rps=()
    for spec in "${specs[@]}"; do
        IFS=: read -r name port pids <<<"$spec"
        IFS=, read -r -a pid_list <<<"$pids"
        read -r u0 s0 <<<"$(ticks "${pid_list[@]}")"
        m0=$(machine_ticks)
        out=$(wrk -t2 -c"$CONNS" -d"${SECS}s" -H "x-proxy-key: $BENCH_KEY" "http://127.0.0.1:$port$BENCH_PATH")
        read -r u1 s1 <<<"$(ticks "${pid_list[@]}")"
        m1=$(machine_ticks)
        rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
        n=$(awk '/requests in/ {print $1}' <<<"$out")
        read -r user sys machine <<<"$(awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v m=$((m1 - m0)) -v n="$n" -v t="$TICK" \
            'BEGIN { k = 1e6 / t / n; printf "%.2f %.2f %.2f", u * k, s * k, m * k }')"
        echo "round $round c=$CONNS $name: $rps req/s, user $user us, system $sys us per request; machine $machine us"
        runs[$name]=$((${runs[$name]:-0} + 1))
        rps_sum[$name]=$(awk -v a="${rps_sum[$name]:-0}" -v b="$rps" 'BEGIN { print a + b }')
        user_sum[$name]=$(awk -v a="${user_sum[$name]:-0}" -v b="$user" 'BEGIN { print a + b }')
        sys_sum[$name]=$(awk -v a="${sys_sum[$name]:-0}" -v b="$sys" 'BEGIN { print a + b }')
        machine_sum[$name]=$(awk -v a="${machine_sum[$name]:-0}" -v b="$machine" 'BEGIN { print a + b }')
        round_rps[$name]=$(awk -v a="${round_rps[$name]:-0}" -v b="$rps" 'BEGIN { print a + b }')
    done
    if [[ $ORDER == abba ]]; then
        ratios+=("$(awk -v b="${round_rps[${B%%:*}]}" -v a="${round_rps[${A%%:*}]}" 'BEGIN { printf "%.3f", b / a }')")
        echo "round $round: ${B%%:*} / ${A%%:*} ${ratios[-1]}"
    fi
done
for spec in "$@"; do
    name=${spec%%:*}
    awk -v n="${runs[$name]}" -v r="${rps_sum[$name]}" -v u="${user_sum[$name]}" -v s="${sys_sum[$name]}" \
        -v m="${machine_sum[$name]}" -v name="$name" \
        'BEGIN { printf "mean %s: %.0f req/s, user %.2f us, system %.2f us per request; machine %.2f us\n", name, r / n, u / n, s / n, m / n }'
done
if [[ $ORDER == abba ]]; then
    printf '%s\n' "${ratios[@]}" | sort -n | awk -v b="${B%%:*}" -v a="${A%%:*}" '{ v[NR] = $1 }
        END { m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
              printf "median of the rounds: %s / %s %.3f (%d rounds)\n", b, a, m, NR }'
fi
