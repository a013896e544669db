#!/usr/bin/env bash
# Load benchmark: ims-proxy against nginx doing the same header job, and both
# against the direct path, side by side on one machine, in one run.
#
# Starts on 127.0.0.1 only:
#   - an upstream nginx: a small JSON answer (HTTP/1.1 and h2c) and a large file;
#   - nginx as a reverse proxy: checks the client key, injects a static
#     `Authorization: Bearer` and `x-api-key`, keep-alive upstream pool
#     (benches/load/nginx-proxy.conf.in);
#   - ims-proxy `run` in front of the same upstream, with a simulated IMS
#     (benches/load/ims_stub.py) and a hashed client key;
#   - for the token-swap scenario, a second ims-proxy, reloaded between its runs
#     to tokens of 2 s (it swaps about once a second) or of a day (no swaps),
#     each mode twice a round in A-B-B-A order.
# Then drives each with wrk (HTTP/1.1 saturation; also the proxy's CPU time per
# request, from /proc/PID/stat, which is steadier than req/s on a shared machine),
# h2load (h2c saturation),
# oha (fixed-rate latency with coordinated-omission correction) and curl
# (1 GiB download), alternating direct / nginx / ims-proxy and rotating their
# order every round, and prints Markdown tables of medians and ratios.
#
# Usage: benches/load.sh            (from anywhere in the repo; Debian/Ubuntu)
# Knobs (environment):
#   ROUNDS=3          rounds; every cell is the median over them
#   DURATION=10       seconds per measured run
#   WARMUP=1          seconds of unmeasured load before each run (0: none)
#   CONNS="32 256"    HTTP/1.1 keep-alive connections (wrk)
#   H2=1              h2c runs with h2load (0: skip)
#   H2_STREAMS=8      concurrent streams per h2 connection (CONNS/H2_STREAMS connections)
#   LATENCY=1         fixed-rate latency runs with oha (0: skip)
#   RATE=auto         requests/s for those; auto = each of RATE_FRACTIONS x nginx's HTTP/1.1 saturation rate
#   RATE_FRACTIONS="0.25 0.5"
#   BIG_MIB=1024      size of the streamed download (0: skip)
#   HOLD_CONNS=10000  idle keep-alive connections held open for the memory reading (0: skip)
#   SWAP=1            token swap scenario (0: skip)
#   LOGS=on           access logs on in both (nginx buffered to a file, ims-proxy's to a file); off: none
#   WORKERS=$(nproc)  nginx proxy worker_processes and ims-proxy `server.workers`,
#                     so both get the same cores
#   WRK_THREADS=2     load-generator threads (wrk, h2load)
#   BASE_PORT=18000   ports BASE_PORT+1 .. BASE_PORT+41 on 127.0.0.1
#   IMS_PROXY_BIN=    use this binary instead of `cargo build --release`
#   OHA=              path to oha (default: PATH, then ~/.cargo/bin; else `cargo install oha --locked`,
#                     which takes 10-30 minutes on two busy cores)
#   OUT=target/load-bench   where the report and raw results go
#   HOLD=0            >0: start everything, print the ports, keep them up this many
#                     seconds without measuring (for perf or callgrind by hand), stop
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-1}
CONNS=${CONNS:-"32 256"}
H2=${H2:-1}
H2_STREAMS=${H2_STREAMS:-8}
LATENCY=${LATENCY:-1}
RATE=${RATE:-auto}
RATE_FRACTIONS=${RATE_FRACTIONS:-"0.25 0.5"}
BIG_MIB=${BIG_MIB:-1024}
HOLD_CONNS=${HOLD_CONNS:-10000}
SWAP=${SWAP:-1}
LOGS=${LOGS:-on}
WORKERS=${WORKERS:-$(nproc)}
WRK_THREADS=${WRK_THREADS:-2}
BASE_PORT=${BASE_PORT:-18000}
IMS_PROXY_BIN=${IMS_PROXY_BIN:-}
OHA=${OHA:-}
OUT=${OUT:-target/load-bench}
HOLD=${HOLD:-0}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
cd "$REPO"

UP_H1=$((BASE_PORT + 1)) UP_H2=$((BASE_PORT + 2))
NGX_H1=$((BASE_PORT + 11)) NGX_H2=$((BASE_PORT + 12))
IMS_PX=$((BASE_PORT + 21)) IMS_ADMIN=$((BASE_PORT + 22))
SWAP_PX=$((BASE_PORT + 31)) SWAP_ADMIN=$((BASE_PORT + 32))
STUB=$((BASE_PORT + 41))

KEY="load-bench-client-key-0123456789"
# The same length as the stub's tokens, so nginx forwards as many bytes as ims-proxy.
TOKEN="eyJbench.static.$(printf 'x%.0s' $(seq 1000))"
API_PATH=/api/v1/items

# Loopback only: no egress proxy may take the benchmark's traffic.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY no_proxy NO_PROXY

log() { printf '[load %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# ---------------------------------------------------------------- tools
as_root() { if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
missing=()
[[ -x $NGINX ]] || missing+=(nginx-light)
command -v wrk >/dev/null || missing+=(wrk)
[[ $H2 != 1 ]] || command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v python3 >/dev/null || missing+=(python3)
command -v curl >/dev/null || missing+=(curl)
command -v pgrep >/dev/null || missing+=(procps)
if ((${#missing[@]})); then
    log "installing ${missing[*]} (apt-get)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    NGINX=$(command -v nginx || echo /usr/sbin/nginx)
fi
if [[ $LATENCY == 1 ]]; then
    [[ -n $OHA ]] || OHA=$(command -v oha || echo "$HOME/.cargo/bin/oha")
    if [[ ! -x $OHA ]]; then
        log "installing oha from crates.io (cargo install oha --locked; 10-30 minutes on two busy cores)"
        cargo install oha --locked >&2 || true
        OHA="$HOME/.cargo/bin/oha"
    fi
    [[ -x $OHA ]] || {
        log "no oha: fixed-rate latency runs skipped"
        LATENCY=0
    }
fi

if [[ -z $IMS_PROXY_BIN ]]; then
    log "cargo build --release"
    cargo build --release --bin ims-proxy >&2
    IMS_PROXY_BIN="${CARGO_TARGET_DIR:-$REPO/target}/release/ims-proxy"
fi
[[ -x $IMS_PROXY_BIN ]] || die "no binary at $IMS_PROXY_BIN"

# Every process here holds thousands of sockets in the 10,000-connection reading.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)

# ---------------------------------------------------------------- processes
WORK=$(mktemp -d /tmp/ims-load.XXXXXX)
chmod 755 "$WORK" # nginx workers may run as another user
mkdir -p "$WORK/tmp" "$WORK/files"
PIDS=()
SAMPLER_PID=

cleanup() {
    local status=$?
    set +e
    [[ -z $SAMPLER_PID ]] || kill "$SAMPLER_PID" 2>/dev/null
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill -TERM "${PIDS[i]}" 2>/dev/null; done
    for _ in $(seq 50); do
        local alive=0
        for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
    wait 2>/dev/null
    if [[ ${KEEP_WORK:-0} == 1 ]]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_http() { # url [header]: until it answers 200, at most 15 s
    for _ in $(seq 150); do
        if [[ $(curl -s -o /dev/null -w '%{http_code}' -m 1 -H "x-proxy-key: $KEY" "$1" || true) == 200 ]]; then
            return 0
        fi
        sleep 0.1
    done
    die "$1 did not answer 200 within 15 s"
}

fill() { # template out: replace @VARS@
    sed -e "s|@WORK@|$WORK|g" -e "s|@UP_H1@|$UP_H1|g" -e "s|@UP_H2@|$UP_H2|g" \
        -e "s|@NGX_H1@|$NGX_H1|g" -e "s|@NGX_H2@|$NGX_H2|g" -e "s|@KEY@|$KEY|g" \
        -e "s|@TOKEN@|$TOKEN|g" -e "s|@NOFILE@|$NOFILE|g" \
        -e "s|@UPSTREAM_WORKERS@|$WORKERS|g" -e "s|@PROXY_WORKERS@|$WORKERS|g" \
        -e "s|@NGINX_ACCESS_LOG@|$NGINX_ACCESS_LOG|g" \
        -e "s|@IMS@|$STUB|g" -e "s|@KEY_SHA256_LINE@|$KEY_LINE|g" \
        "${@:3}" "$1" >"$2"
}

if [[ $LOGS == on ]]; then
    NGINX_ACCESS_LOG="access_log $WORK/nginx-access.log combined buffer=64k flush=1s;"
    RUST_LOG_LEVEL=info
else
    NGINX_ACCESS_LOG="access_log off;"
    RUST_LOG_LEVEL=warn
fi
KEY_LINE=$(printf %s "$KEY" | "$IMS_PROXY_BIN" hash-key)

if [[ $BIG_MIB != 0 ]]; then
    truncate -s "${BIG_MIB}M" "$WORK/files/big" # sparse: read from the page cache, not disk
fi

fill "$HERE/load/nginx-upstream.conf.in" "$WORK/upstream.conf"
fill "$HERE/load/nginx-proxy.conf.in" "$WORK/proxy.conf"
"$NGINX" -t -q -c "$WORK/upstream.conf" -p "$WORK" -g 'daemon off;' 2>&1 | grep -v 'the "user" directive' >&2 || true
"$NGINX" -c "$WORK/upstream.conf" -p "$WORK" -g 'daemon off;' 2>>"$WORK/upstream-error.log" &
PIDS+=($!)
"$NGINX" -c "$WORK/proxy.conf" -p "$WORK" -g 'daemon off;' 2>>"$WORK/proxy-error.log" &
NGX_PID=$!
PIDS+=($NGX_PID)
python3 "$HERE/load/ims_stub.py" "$STUB" >"$WORK/stub.log" 2>&1 &
PIDS+=($!)

start_ims() { # name listen admin pid-variable
    fill "$HERE/load/ims-proxy.toml.in" "$WORK/$1.toml" \
        -e "s|@LISTEN@|$2|g" -e "s|@ADMIN@|$3|g"
    RUST_LOG=$RUST_LOG_LEVEL "$IMS_PROXY_BIN" run --config "$WORK/$1.toml" 2>"$WORK/$1.log" &
    PIDS+=($!)
    eval "$4=$!"
}
wait_http "http://127.0.0.1:$STUB/count"
start_ims ims "$IMS_PX" "$IMS_ADMIN" IMS_PID
[[ $SWAP != 1 ]] || start_ims ims-swap "$SWAP_PX" "$SWAP_ADMIN" SWAP_PID

wait_http "http://127.0.0.1:$UP_H1$API_PATH"
wait_http "http://127.0.0.1:$NGX_H1/bench$API_PATH"
wait_http "http://127.0.0.1:$IMS_ADMIN/readyz"
wait_http "http://127.0.0.1:$IMS_PX/bench$API_PATH"
if [[ $SWAP == 1 ]]; then
    wait_http "http://127.0.0.1:$SWAP_ADMIN/readyz"
    wait_http "http://127.0.0.1:$SWAP_PX/bench$API_PATH"
fi
# Both proxies must have done the header job: check what the upstream would get.
curl -sf -o /dev/null -H "x-proxy-key: wrong" "http://127.0.0.1:$IMS_PX/bench$API_PATH" && die "ims-proxy admitted a wrong key"
curl -sf -o /dev/null -H "x-proxy-key: wrong" "http://127.0.0.1:$NGX_H1/bench$API_PATH" && die "nginx admitted a wrong key"
log "all up in $WORK"
if ((HOLD > 0)); then
    # For profiling by hand (perf record -p, callgrind): the rig stays up, nothing is measured.
    log "holding for ${HOLD}s: direct :$UP_H1 (h2c :$UP_H2), nginx :$NGX_H1/bench (h2c :$NGX_H2), ims-proxy :$IMS_PX/bench (pid $IMS_PID), key $KEY, path $API_PATH"
    sleep "$HOLD" & wait $! # in the background, so a signal stops the rig at once
    exit 0
fi

# ---------------------------------------------------------------- measuring
mkdir -p "$OUT"
STAMP=$(date +%Y%m%d-%H%M%S)
RES="$OUT/load-$STAMP.tsv"
REPORT="$OUT/load-$STAMP.md"
: >"$RES"
rec() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RES"; }

pids_of() { # target -> pids whose memory counts
    case $1 in
        nginx) echo "$NGX_PID" $(pgrep -P "$NGX_PID" || true) ;;
        ims) echo "$IMS_PID" ;;
        ims-swap | ims-still) echo "$SWAP_PID" ;;
        *) ;;
    esac
}
cpu_ticks() { # pids... -> user + system clock ticks, summed (steadier than req/s on a shared machine)
    local t=0 p f
    for p in "$@"; do
        # Fields 14 and 15 of /proc/PID/stat, counted after the ")" that ends the command name.
        f=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{ print $12 + $13 }') || f=0
        t=$((t + ${f:-0}))
    done
    echo "$t"
}
mem_kib() { # pids... -> "rss_kib pss_kib" summed
    local files=()
    for p in "$@"; do files+=("/proc/$p/smaps_rollup"); done
    ((${#files[@]})) || {
        echo "0 0"
        return
    }
    awk '/^Rss:/ { r += $2 } /^Pss:/ { p += $2 } END { print r + 0, p + 0 }' "${files[@]}" 2>/dev/null || echo "0 0"
}
start_sampler() { # target: peak RSS/PSS every 200 ms until stop_sampler
    SAMPLE_FILE="$WORK/sample"
    echo "0 0" >"$SAMPLE_FILE"
    local pids
    pids=$(pids_of "$1")
    [[ -n $pids ]] || return 0
    (
        set +e
        pr=0 pp=0
        while :; do
            read -r r p <<<"$(mem_kib $pids)"
            ((r > pr)) && pr=$r
            ((p > pp)) && pp=$p
            echo "$pr $pp" >"$SAMPLE_FILE.new" && mv "$SAMPLE_FILE.new" "$SAMPLE_FILE"
            sleep 0.2
        done
    ) &
    SAMPLER_PID=$!
}
stop_sampler() { # scenario target round
    if [[ -n $SAMPLER_PID ]]; then
        kill "$SAMPLER_PID" 2>/dev/null || true
        wait "$SAMPLER_PID" 2>/dev/null || true
        SAMPLER_PID=
        local r p
        read -r r p <"$SAMPLE_FILE"
        rec "$1" "$2" "$3" peak_rss_kib "$r"
        [[ $2 != nginx ]] || rec "$1" "$2" "$3" peak_pss_kib "$p"
    fi
}

url_of() { # target proto
    local port
    case $1:$2 in
        direct:h1) echo "http://127.0.0.1:$UP_H1$API_PATH" ;;
        direct:h2) echo "http://127.0.0.1:$UP_H2$API_PATH" ;;
        nginx:h1) echo "http://127.0.0.1:$NGX_H1/bench$API_PATH" ;;
        nginx:h2) echo "http://127.0.0.1:$NGX_H2/bench$API_PATH" ;;
        ims:*) echo "http://127.0.0.1:$IMS_PX/bench$API_PATH" ;;
        ims-swap:* | ims-still:*) echo "http://127.0.0.1:$SWAP_PX/bench$API_PATH" ;;
    esac
}

to_ms() { # "1.23ms" / "456.78us" / "1.2s" -> ms
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000
        printf "%.4f", n }'
}

rotated() { # round -> the targets in that round's order
    # Every rotation, then every rotation reversed: over 2n rounds each target runs
    # in each position, and right after each other target, equally often.
    local t=("$@") r=$ROUND_IDX n=$# order=() i
    for ((i = 0; i < n; i++)); do order+=("${t[((i + r) % n)]}"); done
    if (((r / n) % 2 == 1)); then
        for ((i = n - 1; i >= 0; i--)); do printf '%s ' "${order[i]}"; done
    else
        printf '%s ' "${order[@]}"
    fi
}

run_wrk() { # scenario target round conns
    local url threads out rps p50 p99 errors
    url=$(url_of "$2" h1)
    threads=$((WRK_THREADS < $4 ? WRK_THREADS : $4))
    ((WARMUP == 0)) || wrk -t "$threads" -c "$4" -d "${WARMUP}s" -H "x-proxy-key: $KEY" "$url" >/dev/null 2>&1 || true
    start_sampler "$2"
    local pids t0 reqs
    pids=$(pids_of "$2")
    t0=$(cpu_ticks $pids)
    out=$(wrk -t "$threads" -c "$4" -d "${DURATION}s" --latency -H "x-proxy-key: $KEY" "$url" 2>&1) || true
    stop_sampler "$1" "$2" "$3"
    reqs=$(awk '/requests in/ { print $1 }' <<<"$out")
    if [[ -n $pids && ${reqs:-0} -gt 0 ]]; then
        # The proxy's CPU time per request served (nginx: master and workers).
        rec "$1" "$2" "$3" cpu_us_per_req "$(awk -v t="$(($(cpu_ticks $pids) - t0))" -v hz="$(getconf CLK_TCK)" -v n="$reqs" \
            'BEGIN { printf "%.2f", t * 1000000 / hz / n }')"
    fi
    rps=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
    p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' <<<"$out")")
    p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' <<<"$out")")
    errors=$(awk '/Non-2xx/ { e += $NF } /Socket errors/ { gsub(",", ""); e += $4 + $6 + $8 + $10 } END { print e + 0 }' <<<"$out")
    [[ -n $rps ]] || {
        log "wrk failed: $out"
        return 0
    }
    rec "$1" "$2" "$3" rps "$rps"
    rec "$1" "$2" "$3" p50_ms "$p50"
    rec "$1" "$2" "$3" p99_ms "$p99"
    rec "$1" "$2" "$3" errors "$errors"
    log "$1 $2 round $3: $rps req/s, p50 $p50 ms, p99 $p99 ms, errors $errors"
}

run_h2load() { # scenario target round streams
    local url clients threads out rps mean failed
    url=$(url_of "$2" h2)
    clients=$(($4 / H2_STREAMS))
    ((clients > 0)) || clients=1
    threads=$((WRK_THREADS < clients ? WRK_THREADS : clients))
    ((WARMUP == 0)) || h2load -c "$clients" -m "$H2_STREAMS" -t "$threads" -D "$WARMUP" -H "x-proxy-key: $KEY" "$url" >/dev/null 2>&1 || true
    start_sampler "$2"
    out=$(h2load -c "$clients" -m "$H2_STREAMS" -t "$threads" -D "$DURATION" -H "x-proxy-key: $KEY" "$url" 2>&1) || true
    stop_sampler "$1" "$2" "$3"
    rps=$(awk '/^finished in/ { for (i = 1; i <= NF; i++) if ($(i + 1) ~ /^req\/s/) print $i }' <<<"$out")
    mean=$(to_ms "$(awk '/^time for request:/ { print $6 }' <<<"$out")")
    failed=$(awk '/^requests:/ { for (i = 1; i <= NF; i++) if ($(i + 1) ~ /^(failed|errored)/) e += $i } /^status codes:/ { for (i = 1; i <= NF; i++) if ($(i + 1) ~ /^[345]xx/) e += $i } END { print e + 0 }' <<<"$out")
    [[ -n $rps ]] || {
        log "h2load failed: $out"
        return 0
    }
    rec "$1" "$2" "$3" rps "$rps"
    rec "$1" "$2" "$3" mean_ms "$mean"
    rec "$1" "$2" "$3" errors "$failed"
    log "$1 $2 round $3: $rps req/s, mean $mean ms, errors $failed"
}

run_oha() { # scenario target round proto conns rate
    local url h2=() out
    url=$(url_of "$2" "$4")
    [[ $4 != h2 ]] || h2=(--http2)
    start_sampler "$2"
    out=$("$OHA" --no-tui --output-format json --latency-correction -z "${DURATION}s" -c "$5" -q "$6" \
        "${h2[@]}" -H "x-proxy-key: $KEY" "$url" 2>&1) || true
    stop_sampler "$1" "$2" "$3"
    read -r rps p50 p99 errors < <(python3 -c '
import json, sys
try:
    d = json.loads(sys.stdin.read())
except ValueError:
    print("- - - -"); sys.exit()
s, p = d["summary"], d["latencyPercentiles"]
codes = d.get("statusCodeDistribution", {})
# Requests still in flight when -z ends are "aborted due to deadline": not errors.
errs = d.get("errorDistribution", {})
bad = sum(v for k, v in codes.items() if k != "200") + sum(v for k, v in errs.items() if "deadline" not in k)
print(s["requestsPerSec"], p["p50"] * 1000, p["p99"] * 1000, bad)' <<<"$out")
    [[ $rps != - ]] || {
        log "oha failed: ${out:0:400}"
        return 0
    }
    rec "$1" "$2" "$3" rps "$rps"
    rec "$1" "$2" "$3" p50_ms "$p50"
    rec "$1" "$2" "$3" p99_ms "$p99"
    rec "$1" "$2" "$3" errors "$errors"
    log "$1 $2 round $3: $rps req/s, p50 $p50 ms, p99 $p99 ms, errors $errors"
}

run_download() { # scenario target round
    local url out speed size code
    case $2 in
        direct) url="http://127.0.0.1:$UP_H1/files/big" ;;
        nginx) url="http://127.0.0.1:$NGX_H1/bench/files/big" ;;
        ims) url="http://127.0.0.1:$IMS_PX/bench/files/big" ;;
    esac
    start_sampler "$2"
    out=$(curl -s -o /dev/null -m 300 -w '%{speed_download} %{size_download} %{http_code}' -H "x-proxy-key: $KEY" "$url" || true)
    stop_sampler "$1" "$2" "$3"
    read -r speed size code <<<"$out"
    if [[ $code != 200 || $size != $((BIG_MIB * 1048576)) ]]; then
        log "download through $2 failed: $out"
        return 0
    fi
    rec "$1" "$2" "$3" gibps "$(awk -v s="$speed" 'BEGIN { printf "%.4f", s / 1073741824 }')"
    log "$1 $2 round $3: $(awk -v s="$speed" 'BEGIN { printf "%.2f", s / 1073741824 }') GiB/s"
}

# The token-swap scenario compares one process with itself, the second
# ims-proxy: its credential asks for scope `swap` (the stub then issues 2 s
# tokens, so it swaps about once a second: target ims-swap) or does not
# (day-long tokens: ims-still). A reload switches; a credential whose scopes
# changed gets its new token before the reload returns. Two processes of one
# binary differ by 1-3 % here, as much as the goal's margin.
swap_mode() { # ims-swap | ims-still
    local scopes='"openid"'
    [[ $1 != ims-swap ]] || scopes='"openid", "swap"'
    sed -i "s|^scopes = .*|scopes = [$scopes]|" "$WORK/ims-swap.toml"
    curl -sf -m 10 -X POST "http://127.0.0.1:$SWAP_ADMIN/reload" >/dev/null || die "ims-swap: reload to $1 failed"
    wait_http "http://127.0.0.1:$SWAP_ADMIN/readyz"
}
issued() { curl -s -m 2 "http://127.0.0.1:$STUB/count" | python3 -c 'import json,sys; print(json.load(sys.stdin)["issued"])'; }

# Idle memory, before any load.
for t in nginx ims; do
    read -r r p <<<"$(mem_kib $(pids_of $t))"
    rec "mem: idle" "$t" 1 peak_rss_kib "$r"
    [[ $t != nginx ]] || rec "mem: idle" "$t" 1 peak_pss_kib "$p"
done

TARGETS=(direct nginx ims)
for ((ROUND_IDX = 0; ROUND_IDX < ROUNDS; ROUND_IDX++)); do
    round=$((ROUND_IDX + 1))
    log "round $round/$ROUNDS: saturation"
    for c in $CONNS; do
        for t in $(rotated "${TARGETS[@]}"); do run_wrk "h1 c=$c" "$t" "$round" "$c"; done
    done
    if [[ $H2 == 1 ]]; then
        for c in $CONNS; do
            for t in $(rotated "${TARGETS[@]}"); do run_h2load "h2 $c streams" "$t" "$round" "$c"; done
        done
    fi
    if [[ $SWAP == 1 ]]; then
        c=$(awk '{ print $1 }' <<<"$CONNS")
        # A-B-B-A: each mode runs twice a round, on both sides of the other, so a
        # machine drifting steadily through the round weighs on both alike.
        # Which mode opens alternates between rounds.
        order="ims-still ims-swap ims-swap ims-still"
        ((ROUND_IDX % 2 == 0)) || order="ims-swap ims-still ims-still ims-swap"
        for t in $order; do
            # Reloaded before every run, even one in the mode it is in: each run of
            # either mode then starts the same way.
            swap_mode "$t"
            before=$(issued)
            run_wrk "swap h1 c=$c" "$t" "$round" "$c"
            [[ $t != ims-swap ]] || rec "swap h1 c=$c" ims-swap "$round" swaps $(($(issued) - before))
        done
    fi
done

if [[ $LATENCY == 1 ]]; then
    c=$(awk '{ print $1 }' <<<"$CONNS")
    rates=$RATE
    if [[ $RATE == auto ]]; then
        rates=$(awk -F'\t' -v s="h1 c=$c" '$1 == s && $2 == "nginx" && $4 == "rps" { print $5 }' "$RES" |
            python3 -c 'import statistics, sys
v = [float(x) for x in sys.stdin]
print(" ".join(str(int(statistics.median(v) * float(f))) for f in sys.argv[1:]) if v else "")' $RATE_FRACTIONS)
    fi
    if [[ -z $rates ]]; then
        log "no nginx saturation rate to derive fixed rates from: latency runs skipped (set RATE=N)"
    fi
    for rate in $rates; do
        for ((ROUND_IDX = 0; ROUND_IDX < ROUNDS; ROUND_IDX++)); do
            round=$((ROUND_IDX + 1))
            log "round $round/$ROUNDS: fixed rate $rate req/s"
            for t in $(rotated "${TARGETS[@]}"); do run_oha "h1 c=$c at $rate req/s" "$t" "$round" h1 "$c" "$rate"; done
            if [[ $H2 == 1 ]]; then
                for t in $(rotated "${TARGETS[@]}"); do run_oha "h2 c=$c at $rate req/s" "$t" "$round" h2 "$c" "$rate"; done
            fi
        done
    done
fi

if [[ $BIG_MIB != 0 ]]; then
    # Unmeasured: bring the file into the page cache and every path up to speed.
    ((WARMUP == 0)) || for t in "${TARGETS[@]}"; do run_download "warm-up" "$t" 0 >/dev/null 2>&1; done
    sed -i '/^warm-up\t/d' "$RES"
    for ((ROUND_IDX = 0; ROUND_IDX < ROUNDS; ROUND_IDX++)); do
        round=$((ROUND_IDX + 1))
        for t in $(rotated "${TARGETS[@]}"); do run_download "download ${BIG_MIB} MiB" "$t" "$round"; done
    done
fi

if [[ $HOLD_CONNS != 0 ]]; then
    for t in ims nginx; do
        case $t in
            ims) port=$IMS_PX ;;
            nginx) port=$NGX_H1 ;;
        esac
        fifo="$WORK/hold-$t"
        python3 "$HERE/load/hold_conns.py" 127.0.0.1 "$port" "/bench$API_PATH" "$HOLD_CONNS" "$KEY" 120 >"$fifo" 2>&1 &
        holder=$!
        PIDS+=($holder)
        for _ in $(seq 1200); do
            grep -q '^ready' "$fifo" 2>/dev/null && break
            kill -0 "$holder" 2>/dev/null || break
            sleep 0.1
        done
        ok=$(awk '/^ready/ { print $2 }' "$fifo")
        if [[ -n $ok ]]; then
            sleep 1
            read -r r p <<<"$(mem_kib $(pids_of $t))"
            rec "mem: $HOLD_CONNS keep-alive conns" "$t" 1 peak_rss_kib "$r"
            [[ $t != nginx ]] || rec "mem: $HOLD_CONNS keep-alive conns" "$t" 1 peak_pss_kib "$p"
            log "$t with $ok/$HOLD_CONNS keep-alive connections open: RSS $((r / 1024)) MiB"
        else
            log "$t: could not hold $HOLD_CONNS connections: $(tail -3 "$fifo")"
        fi
        kill "$holder" 2>/dev/null || true
        wait "$holder" 2>/dev/null || true
        sleep 1
    done
fi

# Peak over the whole run, as the kernel saw it.
rec "mem: whole run (VmHWM)" ims 1 peak_rss_kib "$(awk '/^VmHWM:/ { print $2 }' "/proc/$IMS_PID/status")"

{
    echo "## ims-proxy load benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- machine: $(nproc) CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r)"
    echo "- ims-proxy $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'), $("$NGINX" -v 2>&1 | sed 's/.*: //'), wrk $(wrk -v 2>&1 | awk 'NR == 1 { print $2 }')$([[ $H2 != 1 ]] || echo ", $(h2load --version | head -1)")$([[ $LATENCY != 1 ]] || echo ", $("$OHA" --version)")"
    echo "- rounds $ROUNDS x ${DURATION}s (+${WARMUP}s warm-up), order rotated each round, reversed from round $((${#TARGETS[@]} + 1)) on; nginx worker_processes $WORKERS, ims-proxy workers $WORKERS; load generator threads $WRK_THREADS; access logs $LOGS"
    echo "- h1: wrk, c keep-alive connections; h2: h2load, c/$H2_STREAMS connections x $H2_STREAMS streams (h2load reports mean latency only); fixed rate: oha -q with --latency-correction; download: curl"
    echo "- ratios are ims-proxy / nginx and ims-proxy / direct; 'added' is latency over the direct path (ms)"
    echo
    python3 "$HERE/load/summarize.py" "$RES"
} | tee "$REPORT"
log "report: $REPORT (raw: $RES)"
