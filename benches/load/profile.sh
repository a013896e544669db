#!/usr/bin/env bash
# Instruction and allocation profile of ims-proxy's request path, per request.
#
# Starts the same upstream nginx and IMS stub as benches/load.sh, runs the
# release ims-proxy under valgrind, sends a fixed number of small-JSON requests
# with oha (HTTP/1.1 keep-alive), and writes into OUT:
#   callgrind.out, callgrind-inclusive.txt  instructions (inclusive), counted
#       only while the requests run (warm-up and start excluded);
#   dhat-N.json, dhat-summary.txt  allocations: two runs of N1 and N2 requests,
#       whose difference divided by N2-N1 is allocations per request with the
#       start-up cost cancelled out, plus the top allocation sites.
#
# Usage: benches/load/profile.sh   (needs valgrind, nginx, oha, python3)
# Knobs: REQUESTS=20000 (callgrind), N1=2000 N2=12000 (dhat), CONNS=8, ACCESS_LOG=on,
#        SWAP=0 (1: tokens live 2 s, so the proxy swaps its token about once a second;
#        the summary says how many tokens were issued while the requests ran),
#        DHAT=1 (0: callgrind only), H2=0 (1: the client speaks h2c, CONNS connections
#        with 4 streams each),
#        PROXY=ims (nginx: count the instructions of load.sh's nginx proxy instead, one
#        worker with no master process, doing the same job on the same load; callgrind
#        only: its allocations are pooled per request and say little),
#        CACHE=0 (1: callgrind also simulates the caches, a 32 KiB L1 and a 1 MiB
#        last level like one core's L2 here, and the summary gives the data misses
#        per request: how much of the working set falls out of cache as CONNS grows),
#        IMS_PROXY_BIN, OHA, OUT=target/load-bench/profile, BASE_PORT=18100
set -euo pipefail

REQUESTS=${REQUESTS:-20000}
N1=${N1:-2000}
N2=${N2:-12000}
CONNS=${CONNS:-8}
ACCESS_LOG=${ACCESS_LOG:-on}
SWAP=${SWAP:-0}
DHAT=${DHAT:-1}
H2=${H2:-0}
PROXY=${PROXY:-ims}
CACHE=${CACHE:-0}
BASE_PORT=${BASE_PORT:-18100}
OUT=${OUT:-target/load-bench/profile}
OHA=${OHA:-$(command -v oha || echo "$HOME/.cargo/bin/oha")}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
cd "$REPO"
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY no_proxy NO_PROXY

log() { printf '[profile %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
[[ -x $OHA ]] || { log "needs oha (cargo install oha --locked) or OHA=path"; exit 1; }
if [[ -z ${IMS_PROXY_BIN:-} && $PROXY != nginx ]]; then
    cargo build --release --bin ims-proxy >&2
    IMS_PROXY_BIN="${CARGO_TARGET_DIR:-$REPO/target}/release/ims-proxy"
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

UP_H1=$((BASE_PORT + 1)) UP_H2=$((BASE_PORT + 2)) PX=$((BASE_PORT + 21)) ADMIN=$((BASE_PORT + 22)) STUB=$((BASE_PORT + 41))
NGX_H2=$((BASE_PORT + 12)) LOAD_PORT=$((BASE_PORT + 21))
KEY="load-bench-client-key-0123456789"
WORK=$(mktemp -d /tmp/ims-profile.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/tmp" "$WORK/files" "$OUT"
OUT=$(cd "$OUT" && pwd)
PIDS=()
cleanup() {
    set +e
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill -TERM "${PIDS[i]}" 2>/dev/null; done
    sleep 1
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ $PROXY == nginx ]]; then
    [[ $ACCESS_LOG == on ]] && ACCESS="access_log $WORK/nginx-access.log combined buffer=64k flush=1s;" || ACCESS="access_log off;"
    sed -e "s|@WORK@|$WORK|g" -e "s|@UP_H1@|$UP_H1|g" -e "s|@NGX_H1@|$PX|g" -e "s|@NGX_H2@|$NGX_H2|g" \
        -e "s|@KEY@|$KEY|g" -e "s|@TOKEN@|eyJbench.static.$(printf 'x%.0s' $(seq 1000))|g" -e "s|@NOFILE@|4096|g" \
        -e "s|@PROXY_WORKERS@|1|g" -e "s|@NGINX_ACCESS_LOG@|$ACCESS|g" \
        "$HERE/nginx-proxy.conf.in" >"$WORK/proxy.conf"
    PROXY_CMD=("$NGINX" -c "$WORK/proxy.conf" -p "$WORK" -g 'daemon off; master_process off;')
    # nginx takes h2c on a listener of its own.
    [[ $H2 == 1 ]] && LOAD_PORT=$NGX_H2
    DHAT=0
else
    KEY_LINE=$(printf %s "$KEY" | "$IMS_PROXY_BIN" hash-key)
    PROXY_CMD=("$IMS_PROXY_BIN" run --config "$WORK/ims.toml")
fi
sed -e "s|@WORK@|$WORK|g" -e "s|@UP_H1@|$UP_H1|g" -e "s|@UP_H2@|$UP_H2|g" -e "s|@NOFILE@|4096|g" \
    -e "s|@UPSTREAM_WORKERS@|1|g" "$HERE/nginx-upstream.conf.in" >"$WORK/upstream.conf"
# Scope `swap`: the stub's tokens then live 2 s.
SCOPES='"openid"'
[[ $SWAP != 1 ]] || SCOPES='"openid", "swap"'
sed -e "s|@LISTEN@|$PX|g" -e "s|@ADMIN@|$ADMIN|g" -e "s|@IMS@|$STUB|g" -e "s|^scopes = .*|scopes = [$SCOPES]|" \
    -e "s|@UP_H1@|$UP_H1|g" -e "s|@KEY_SHA256_LINE@|${KEY_LINE:-}|g" -e "s|@PROXY_WORKERS@|2|g" \
    "$HERE/ims-proxy.toml.in" >"$WORK/ims.toml"
"$NGINX" -c "$WORK/upstream.conf" -p "$WORK" -g 'daemon off;' 2>>"$WORK/upstream-error.log" &
PIDS+=($!)
python3 "$HERE/ims_stub.py" "$STUB" >/dev/null 2>&1 &
PIDS+=($!)
[[ $ACCESS_LOG == on ]] && LEVEL=info || LEVEL=warn

wait_ok() { # url, 60 s (valgrind starts slowly)
    for _ in $(seq 600); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' -m 2 -H "x-proxy-key: $KEY" "$1" || true) == 200 ]] && return 0
        sleep 0.1
    done
    log "$1 never answered 200"
    exit 1
}
URL="http://127.0.0.1:$PX/bench/api/v1/items"
LOAD_URL="http://127.0.0.1:$LOAD_PORT/bench/api/v1/items"
H2_ARGS=()
[[ $H2 == 1 ]] && H2_ARGS=(--http2 -p 4)
load() { "$OHA" --no-tui --output-format quiet -n "$1" -c "$CONNS" "${H2_ARGS[@]}" -H "x-proxy-key: $KEY" "$LOAD_URL" >/dev/null; }
stop_proxy() { # pid: SIGTERM, wait up to 60 s
    kill -TERM "$1"
    for _ in $(seq 600); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
}

# --- callgrind: instructions, counted only around the measured requests
log "callgrind: $REQUESTS requests"
CACHE_ARGS=()
[[ $CACHE == 1 ]] && CACHE_ARGS=(--cache-sim=yes --I1=32768,8,64 --D1=32768,8,64 --LL=1048576,8,64)
RUST_LOG=$LEVEL valgrind --tool=callgrind "${CACHE_ARGS[@]}" --callgrind-out-file="$WORK/callgrind.out" \
    "${PROXY_CMD[@]}" 2>"$WORK/callgrind.log" &
VG=$!
PIDS+=($VG)
wait_ok "$URL"
load 500
tokens() { curl -s -m 5 "http://127.0.0.1:$STUB/count" | tr -cd 0-9; } # {"issued": N}
issued=$(tokens)
callgrind_control -z "$VG" >/dev/null # zero: start-up and warm-up are not counted
load "$REQUESTS"
callgrind_control -d "$VG" >/dev/null # dump: exactly the measured requests
issued=$(($(tokens) - issued))
sleep 1
stop_proxy "$VG"
dump=$(ls -t "$WORK"/callgrind.out.* 2>/dev/null | grep -v '\.out$' | head -1 || true)
[[ -n $dump ]] || dump="$WORK/callgrind.out"
cp "$dump" "$OUT/callgrind.out"
callgrind_annotate --inclusive=yes "$OUT/callgrind.out" >"$OUT/callgrind-inclusive.txt" 2>/dev/null || true
callgrind_annotate "$OUT/callgrind.out" >"$OUT/callgrind-self.txt" 2>/dev/null || true
total=$(awk '/^summary:|^totals:/ { gsub(",", "", $2); print $2; exit }' "$OUT/callgrind.out")
log "callgrind: $total instructions, $((total / REQUESTS)) per request, $issued tokens issued meanwhile"
echo "requests $REQUESTS instructions $total per_request $((total / REQUESTS)) tokens_issued $issued" >"$OUT/callgrind-summary.txt"
if [[ $CACHE == 1 ]]; then # events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw
    awk -v n="$REQUESTS" '/^events:/ { for (i = 2; i <= NF; i++) name[i] = $i }
        /^summary:|^totals:/ { line = ""; for (i = 2; i <= NF; i++) line = line sprintf(" %s %.1f", name[i], $i / n)
            print "per request:" line; exit }' "$OUT/callgrind.out" | tee -a "$OUT/callgrind-summary.txt"
fi
if [[ $DHAT != 1 ]]; then
    log "profile in $OUT (no dhat)"
    exit 0
fi

# --- dhat: allocations per request, start-up cancelled by two runs
for n in "$N1" "$N2"; do
    log "dhat: $n requests"
    RUST_LOG=$LEVEL valgrind --tool=dhat --dhat-out-file="$OUT/dhat-$n.json" \
        "$IMS_PROXY_BIN" run --config "$WORK/ims.toml" 2>"$WORK/dhat-$n.log" &
    VG=$!
    PIDS+=($VG)
    wait_ok "$URL"
    load "$n"
    stop_proxy "$VG"
done
python3 - "$OUT/dhat-$N1.json" "$OUT/dhat-$N2.json" "$((N2 - N1))" >"$OUT/dhat-summary.txt" <<'EOF'
import json, sys
from collections import Counter

# Frames that only say "something allocated": the site is the first frame past them.
SHIMS = ("library/alloc", "library/core", "library/std", "alloc.rs", "raw_vec", "__rust", "malloc",
         "realloc", "calloc", "hashbrown", "bytes_mut.rs", "/vec/", "string.rs", "boxed.rs", "sync.rs")

def load(path):
    d = json.load(open(path))
    frames = d["ftbl"]
    sites = Counter()
    blocks = 0
    for pp in d["pps"]:
        blocks += pp["tbk"]  # tbk: total blocks allocated at this point; tb: bytes
        # The first frame that is not an allocator shim names the site.
        name = "?"
        for f in pp["fs"]:
            text = frames[f]
            if any(s in text for s in SHIMS):
                continue
            name = text.split(": ", 1)[-1][:160]
            break
        sites[name] += pp["tbk"]
    return blocks, sites

b1, s1 = load(sys.argv[1])
b2, s2 = load(sys.argv[2])
n = int(sys.argv[3])
print(f"allocations per request: {(b2 - b1) / n:.1f}  ({b1} blocks after N1, {b2} after N2, {n} requests apart)")
print("\nTop allocation sites per request (difference of the two runs):")
diff = Counter({k: s2[k] - s1.get(k, 0) for k in s2})
for site, c in diff.most_common(40):
    if c <= 0:
        break
    print(f"{c / n:7.2f}  {site}")
EOF
head -45 "$OUT/dhat-summary.txt" >&2 || true
log "profile in $OUT"
