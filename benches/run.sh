#!/usr/bin/env bash
# regmirror against its peers, on loopback, in one run.
#
#   benches/run.sh                  # the full suite (~10 minutes)
#   QUICK=1 benches/run.sh          # a smoke run (~2 minutes)
#   ONLY="blob manifest" benches/run.sh
#   REGMIRROR_BIN=/path/to/regmirror benches/run.sh   # measure another build, skip cargo
#   KEEP=1 benches/run.sh           # keep the work dir (logs, raw figures) for a look after
#
# Workloads (names for ONLY): blob manifest cold-pull cold-first-byte concurrent rss startup.
#
# The machine is shared and small (2 cores, others compiling), so absolute figures are noisy.
# Every workload is therefore a ratio against a peer measured in the same run, interleaved
# round by round (the order flips every round so neither side always goes first), and the
# table shows the median with the min–max over the rounds. The peers:
#   upstream      CNCF distribution 2.8 (docker-registry) holding the fixture images;
#   distribution  the same program in proxy mode (proxy.remoteurl = upstream);
#   nginx-cache   nginx proxy_cache in front of the upstream (cache_lock on, Accept in the
#                 manifest cache key);
#   nginx-files   nginx serving the upstream's blob files with sendfile, worker_processes 1
#                 (nginx-files-auto: the same with worker_processes auto, 2 here).
# Everything lives in a temp dir; every process started is killed on exit.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO

# --- knobs: a full run by default, QUICK=1 for a smoke run; each can be set on its own.
if [[ ${QUICK:-0} == 1 ]]; then
    defaults=(1 1 1 2 1 3 10000 1)
else
    defaults=(5 3 3 5 3 10 100000 3)
fi
ROUNDS=${ROUNDS:-${defaults[0]}}                       # rounds of each wrk workload
WRK_SECONDS=${WRK_SECONDS:-${defaults[1]}}             # length of one wrk measurement
COLD_ROUNDS=${COLD_ROUNDS:-${defaults[2]}}             # hyperfine rounds of the cold pull
FIRST_BYTE_ROUNDS=${FIRST_BYTE_ROUNDS:-${defaults[3]}} # cold first-byte samples
CONCURRENT_ROUNDS=${CONCURRENT_ROUNDS:-${defaults[4]}} # rounds of 8 concurrent cold pulls
RSS_SECONDS=${RSS_SECONDS:-${defaults[5]}}             # length of the 256-connection load
STARTUP_BLOBS=${STARTUP_BLOBS:-${defaults[6]}}         # cached blobs for the startup time
STARTUP_ROUNDS=${STARTUP_ROUNDS:-${defaults[7]}}
ONLY=${ONLY:-blob manifest cold-pull cold-first-byte concurrent rss startup}
export RUST_LOG=${RUST_LOG:-info} # regmirror's default: one log line per request, like the peers

# Fixture repositories: name, tag and layer sizes in MiB.
readonly SMALL=bench/small LARGE=bench/large MULTI=bench/multi
readonly MANIFEST_ACCEPT="application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/regmirror-bench.XXXXXX")
export WORK
# nginx workers run as another user unless `user root`; let them through either way.
chmod 755 "$WORK"
mkdir -p "$WORK"/{pids,ports,logs,data,results,tmp}
TABLE=$WORK/table.md

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# --- processes -------------------------------------------------------------------------
# Each service NAME has a pid file, a port file and a log under $WORK, so that functions
# exported to hyperfine's --prepare shells (which cannot touch this shell's variables) can
# restart one, and the exit trap finds every process whoever started it.

cleanup() {
    local status=$? pidfile
    trap - EXIT INT TERM
    for pidfile in "$WORK"/pids/*.pid; do
        [[ -e $pidfile ]] && stop_service "$(basename "$pidfile" .pid)"
    done
    if [[ ${KEEP:-0} == 1 ]]; then
        log "work dir kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# spawn NAME CMD...: runs CMD in the background, its output appended to NAME's log.
spawn() {
    local name=$1
    shift
    : >>"$WORK/logs/$name.log" # exists before the child opens it: callers read it at once
    "$@" </dev/null >>"$WORK/logs/$name.log" 2>&1 &
    echo $! >"$WORK/pids/$name.pid"
}

pid_of() { cat "$WORK/pids/$1.pid"; }
port_of() { cat "$WORK/ports/$1"; }
addr_of() { echo "127.0.0.1:$(port_of "$1")"; }
log_lines() { if [[ -e $WORK/logs/$1.log ]]; then wc -l <"$WORK/logs/$1.log"; else echo 0; fi; }

# stop_service NAME: SIGTERM, then SIGKILL after 5 s. Polls rather than `wait`s: the process
# may have been started by another shell.
stop_service() {
    local name=$1 pid i
    [[ -e $WORK/pids/$name.pid ]] || return 0
    pid=$(pid_of "$name")
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$WORK/pids/$name.pid"
}

# await_port NAME FROM REGEX: waits (10 s at most) for a line after line FROM of NAME's log
# matching REGEX, whose first group is the port the service bound; records it.
await_port() {
    local name=$1 from=$2 regex=$3 port i
    for ((i = 0; i < 200; i++)); do
        # One sed reading the file: a pipe into `head` could fail the assignment with SIGPIPE.
        port=$(sed -nE "$((from + 1)),\$ { s/.*${regex}.*/\1/; T; p; q }" "$WORK/logs/$name.log")
        if [[ -n $port ]]; then
            echo "$port" >"$WORK/ports/$name"
            return 0
        fi
        kill -0 "$(pid_of "$name")" 2>/dev/null || break
        sleep 0.05
    done
    tail -n 20 "$WORK/logs/$name.log" >&2
    die "$name did not start (log above)"
}

# await_http URL: waits (10 s at most) for URL to answer 200.
await_http() {
    local i
    for ((i = 0; i < 200; i++)); do
        curl -fs -o /dev/null "$1" && return 0
        sleep 0.05
    done
    die "no answer from $1"
}

# free_port: a loopback port nobody listens on, for nginx, which cannot report a port 0.
free_port() {
    local i port
    for ((i = 0; i < 100; i++)); do
        port=$((20000 + RANDOM % 40000))
        [[ -z $(ss -Htln "sport = :$port") ]] && echo "$port" && return 0
    done
    die "no free port found"
}

# --- the services ----------------------------------------------------------------------

# registry_config NAME PORT [REMOTE]: distribution's config; with REMOTE, a proxy of it.
registry_config() {
    local name=$1 port=$2 remote=${3:-}
    cat <<EOF
version: 0.1
log: {level: info}
storage:
  filesystem: {rootdirectory: $WORK/data/$name}
  cache: {blobdescriptor: inmemory}
  delete: {enabled: true}
http: {addr: "127.0.0.1:$port", secret: regmirror-bench}
EOF
    [[ -z $remote ]] || printf 'proxy: {remoteurl: "%s"}\n' "$remote"
}

# start_registry NAME PORT [REMOTE]: distribution, as the upstream or (with REMOTE) a proxy.
start_registry() {
    local name=$1 port=$2 remote=${3:-} from
    registry_config "$name" "$port" "$remote" >"$WORK/$name.yml"
    from=$(log_lines "$name")
    spawn "$name" docker-registry serve "$WORK/$name.yml"
    await_port "$name" "$from" 'listening on 127\.0\.0\.1:([0-9]+)'
}

# start_NAME PORT: starts service NAME on PORT, or on any free port if PORT is 0.
start_upstream() { start_registry upstream "$1"; }
start_distribution() { start_registry distribution "$1" "http://$(addr_of upstream)"; }

start_regmirror() {
    local from
    from=$(log_lines regmirror)
    spawn regmirror "$REGMIRROR_BIN" serve --listen "127.0.0.1:$1" \
        --cache-dir "${REGMIRROR_CACHE:-$WORK/data/regmirror}" --upstream "http://$(addr_of upstream)"
    await_port regmirror "$from" 'listening addr=127\.0\.0\.1:([0-9]+)'
    await_http "http://$(addr_of regmirror)/readyz"
}

# nginx_config NAME WORKERS SERVER_BLOCK: the shared frame of every nginx peer.
nginx_config() {
    local name=$1 workers=$2 server=$3 temp=$WORK/data/$1/temp user=''
    mkdir -p "$temp"
    # As root, nginx's workers would run as nobody and could not read the blob files.
    ((EUID != 0)) || user='user root;'
    cat <<EOF
worker_processes $workers;
daemon off;
pid $WORK/data/$name/nginx.pid;
error_log $WORK/logs/$name.log warn;
$user
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;  # as many as regmirror allows on one connection
    client_body_temp_path $temp/body;
    proxy_temp_path $temp/proxy;
    fastcgi_temp_path $temp/fastcgi;
    uwsgi_temp_path $temp/uwsgi;
    scgi_temp_path $temp/scgi;
    sendfile on;
    tcp_nopush on;
$server
}
EOF
}

# start_nginx NAME WORKERS SERVER_BLOCK_FUNCTION PORT
start_nginx() {
    local name=$1 workers=$2 server=$3 port=$4
    ((port != 0)) || port=$(free_port)
    echo "$port" >"$WORK/ports/$name"
    nginx_config "$name" "$workers" "$("$server" "$port")" >"$WORK/$name.conf"
    spawn "$name" nginx -e "$WORK/logs/$name.log" -c "$WORK/$name.conf"
    await_http "http://127.0.0.1:$port/v2/"
}

# The blob files as a static tree /v2/<name>/blobs/sha256:<hex> (symlinks into the upstream).
nginx_files_server() {
    cat <<EOF
    server {
        listen 127.0.0.1:$1 reuseport;  # spreads connections evenly over the workers
        root $WORK/files;
        default_type application/octet-stream;
        location = /v2/ { return 200 "{}"; }
    }
EOF
}

# A caching proxy of the upstream. Manifests by tag depend on the Accept header (an OCI
# client and a schema2-only client get different answers), so Accept is in their cache key;
# blobs are content-addressed and keyed by path alone.
nginx_cache_server() {
    cat <<EOF
    proxy_cache_path $WORK/data/nginx-cache/cache levels=1:2 keys_zone=mirror:16m max_size=4g inactive=1h use_temp_path=off;
    upstream registry {
        server $(addr_of upstream);
        keepalive 32;
    }
    server {
        listen 127.0.0.1:$1;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host \$http_host;
        add_header X-Cache-Status \$upstream_cache_status always;
        proxy_cache_lock on;
        proxy_cache_lock_timeout 5m;  # followers wait for the fill, never fetch on their own
        proxy_cache_lock_age 5m;
        location ~ ^/v2/.+/manifests/ {
            proxy_pass http://registry;
            proxy_cache mirror;
            proxy_cache_key "\$uri|\$http_accept";
            proxy_cache_valid 200 5m;  # regmirror's default tag_ttl
        }
        location ~ ^/v2/.+/blobs/sha256: {
            proxy_pass http://registry;
            proxy_cache mirror;
            proxy_cache_key \$uri;
            proxy_cache_valid 200 1y;
        }
        location /v2/ {
            proxy_pass http://registry;
        }
    }
EOF
}

start_nginx_files() { start_nginx nginx-files 1 nginx_files_server "$1"; }
start_nginx_files_auto() { start_nginx nginx-files-auto auto nginx_files_server "$1"; }
start_nginx_cache() { start_nginx nginx-cache 1 nginx_cache_server "$1"; }

# restart NAME: the same service on the same port, cache kept; fresh NAME: cache emptied.
restart() {
    local name=$1 port
    port=$(port_of "$name")
    stop_service "$name"
    "start_${name//-/_}" "$port"
}
fresh() {
    stop_service "$1"
    rm -rf "${WORK:?}/data/$1"
    restart "$1"
}
# hyperfine's --prepare runs in `bash -c`: it sees exported functions, not this shell's.
export -f log die spawn pid_of port_of addr_of log_lines stop_service await_port await_http \
    start_regmirror restart fresh

# --- fixtures --------------------------------------------------------------------------

# make_image LAYOUT TAG MIB...: an image with one layer of random bytes per size given.
make_image() {
    local layout=$1 tag=$2 bundle=$WORK/tmp/bundle-$2 i=0 mib
    shift 2
    umoci new --image "$layout:$tag"
    umoci unpack --rootless --image "$layout:$tag" "$bundle" >/dev/null
    for mib in "$@"; do
        i=$((i + 1))
        head -c "${mib}M" /dev/urandom >"$bundle/rootfs/layer-$i"
        umoci repack --refresh-bundle --image "$layout:$tag" "$bundle"
    done
    rm -rf "$bundle"
}

push_image() {
    skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$1:$2" "docker://$(addr_of upstream)/$3"
}

# layer_digests REPO TAG: the layer digests of a manifest in the upstream.
layer_digests() {
    curl -fsS -H "Accept: $MANIFEST_ACCEPT" "http://$(addr_of upstream)/v2/$1/manifests/$2" | jq -r '.layers[].digest'
}

# link_blob REPO DIGEST: exposes an upstream blob file to nginx-files.
link_blob() {
    local hex=${2#sha256:} dir=$WORK/files/v2/$1/blobs
    mkdir -p "$dir"
    ln -sf "$WORK/data/upstream/docker/registry/v2/blobs/sha256/${hex:0:2}/$hex/data" "$dir/$2"
}

make_fixtures() {
    local layout=$WORK/tmp/layout
    log "building fixture images (1 MiB, 64 MiB, 4x64 MiB layers)"
    umoci init --layout "$layout"
    make_image "$layout" small 1
    make_image "$layout" large 64
    make_image "$layout" multi 64 64 64 64
    push_image "$layout" small "$SMALL:1m"
    push_image "$layout" large "$LARGE:64m"
    push_image "$layout" multi "$MULTI:256m"
    rm -rf "$layout"
    SMALL_BLOB=$(layer_digests "$SMALL" 1m)
    LARGE_BLOB=$(layer_digests "$LARGE" 64m)
    LARGE_BYTES=$(stat -c %s "$WORK/data/upstream/docker/registry/v2/blobs/sha256/${LARGE_BLOB:7:2}/${LARGE_BLOB#sha256:}/data")
    SMALL_MANIFEST=sha256:$(curl -fsS -H "Accept: $MANIFEST_ACCEPT" \
        "http://$(addr_of upstream)/v2/$SMALL/manifests/1m" | sha256sum | cut -d' ' -f1)
    link_blob "$SMALL" "$SMALL_BLOB"
    link_blob "$LARGE" "$LARGE_BLOB"
}

# blob_path SIZE: the path of the 1m or 64m fixture blob.
blob_path() {
    case $1 in
        1m) echo "/v2/$SMALL/blobs/$SMALL_BLOB" ;;
        64m) echo "/v2/$LARGE/blobs/$LARGE_BLOB" ;;
        *) die "no fixture blob of size $1" ;;
    esac
}

# check_blob NAME PATH: fetches a blob through NAME and checks its digest; warms NAME's cache.
check_blob() {
    local actual
    actual=sha256:$(curl -fsS "http://$(addr_of "$1")$2" | sha256sum | cut -d' ' -f1)
    [[ $2 == *"$actual" ]] || die "$1 served $actual for $2"
}

# --- measuring and tabulating ----------------------------------------------------------

# record WORKLOAD SUBJECT VALUE: one round's figure.
record() { echo "$3" >>"$WORK/results/$1.$2"; }
results() { echo "$WORK/results/$1.$2"; }

# stats FILE: "median min max" of the figures in FILE.
stats() {
    sort -g "$1" | awk '{ v[NR] = $1 }
        END { m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print m, v[1], v[NR] }'
}
median() { stats "$1" | cut -d' ' -f1; }
maximum() { stats "$1" | cut -d' ' -f3; }

# cell FILE DECIMALS: "median [min–max]", or the one figure when all rounds agree.
cell() {
    stats "$1" | awk -v d="$2" '{ if ($2 == $3) printf "%.*f", d, $1; else printf "%.*f [%.*f–%.*f]", d, $1, d, $2, d, $3 }'
}

# verdict CONDITION VALUE: "yes" if CONDITION (an awk expression over v) holds for VALUE.
verdict() {
    if [[ -z $1 ]]; then
        echo –
    elif awk -v v="$2" "BEGIN { exit !($1) }"; then
        echo yes
    else
        echo "**no**"
    fi
}

row() {
    { printf '| %s ' "$@" && echo '|'; } | tee -a "$TABLE"
}

# compare LABEL WORKLOAD PEER DECIMALS [TARGET CONDITION]: regmirror's figures in WORKLOAD,
# PEER's, their per-round ratio, and whether CONDITION (over v = the median ratio) holds.
compare() {
    local label=$1 workload=$2 peer=$3 decimals=$4 target=${5:-–} condition=${6:-}
    local mine theirs ratio
    mine=$(results "$workload" regmirror)
    theirs=$(results "$workload" "$peer")
    ratio=$(results "$workload" "ratio-$peer")
    paste "$mine" "$theirs" | awk '{ print ($2 > 0 ? $1 / $2 : 0) }' >"$ratio"
    row "$label" "$(cell "$mine" "$decimals")" "$peer" "$(cell "$theirs" "$decimals")" \
        "$(cell "$ratio" 2)x" "$target" "$(verdict "$condition" "$(median "$ratio")")"
}

# absolute LABEL FILE DECIMALS TARGET CONDITION [STAT]: a figure of regmirror's alone against
# its target; CONDITION is over v = the median, or the worst round with STAT=maximum.
absolute() {
    row "$1" "$(cell "$2" "$3")" – – – "$4" "$(verdict "$5" "$("${6:-median}" "$2")")"
}

# in_round_order ROUND ITEM...: the items, one a line, reversed every other round.
in_round_order() {
    local round=$1
    shift
    if ((round % 2)); then printf '%s\n' "$@"; else printf '%s\n' "$@" | tac; fi
}

# wrk_run URL CONNECTIONS [HEADER]: "bytes requests seconds cpu-seconds" of one wrk run of
# WRK_SECONDS, the last being wrk's own CPU time. A run with errors or non-2xx answers stops
# the suite: a peer answering 404 fast would look fast.
wrk_run() {
    local url=$1 connections=$2 header=${3:-} bytes requests seconds errors TIMEFORMAT='%U %S'
    local args=(-t2 "-c$connections" "-d${WRK_SECONDS}s" --timeout 60s -s "$WORK/report.lua")
    local out=$WORK/tmp/wrk.$BASHPID
    [[ -z $header ]] || args+=(-H "$header")
    { time wrk "${args[@]}" "$url" >"$out"; } 2>"$out.time"
    read -r bytes requests seconds errors < <(sed -n 's/^RESULT //p' "$out")
    ((errors == 0)) || die "wrk saw $errors errors or non-2xx answers from $url"
    echo "$bytes $requests $seconds $(tail -n1 "$out.time" | awk '{ print $1 + $2 }')"
}

# per N D SCALE: N / D / SCALE (SCALE may be an awk expression such as 2^30).
per() { awk -v n="$1" -v d="$2" "BEGIN { print n / d / ($3) }"; }

# cpu_ticks NAME: user + system CPU time NAME has used so far, in clock ticks; for nginx,
# the master's and its workers'.
cpu_ticks() {
    local pid children
    pid=$(pid_of "$1")
    mapfile -t children < <(pgrep -P "$pid")
    (cd /proc && awk '{ t += $14 + $15 } END { print t }' "$pid/stat" "${children[@]/%//stat}")
}

# wrk_rounds WORKLOAD CONNECTIONS PATH HEADER PEER...: ROUNDS rounds of one wrk run against
# each PEER in turn. Records per round and peer, in WORKLOAD.<figure>:
#   gib, rps          GiB/s and requests/s;
#   gib-cpu, rps-cpu  the same per second of the server's own CPU time;
#   gib-all, rps-all  the same per second of CPU time of the server and wrk together.
# Why the last two: the machine is shared, so throughput also depends on how many threads a
# server has to claim CPU with (nginx-files has one, regmirror a pool), while the work done
# per byte does not. And on loopback the client's receive work depends on how the server sent
# (sendfile'd page-cache pages cost wrk more to receive), so the server alone flatters sendfile.
wrk_rounds() {
    local workload=$1 connections=$2 path=$3 header=$4 round peer order before bytes requests seconds
    local client server all
    shift 4
    for ((round = 1; round <= ROUNDS; round++)); do
        mapfile -t order < <(in_round_order "$round" "$@")
        for peer in "${order[@]}"; do
            before=$(cpu_ticks "$peer")
            read -r bytes requests seconds client < <(wrk_run "http://$(addr_of "$peer")$path" "$connections" "$header")
            server=$(awk -v t="$(($(cpu_ticks "$peer") - before))" -v hz="$CLK_TCK" 'BEGIN { print (t > 0 ? t : 1) / hz }')
            all=$(awk -v a="$server" -v b="$client" 'BEGIN { print a + b }')
            record "$workload.gib" "$peer" "$(per "$bytes" "$seconds" 2^30)"
            record "$workload.rps" "$peer" "$(per "$requests" "$seconds" 1)"
            record "$workload.gib-cpu" "$peer" "$(per "$bytes" "$server" 2^30)"
            record "$workload.rps-cpu" "$peer" "$(per "$requests" "$server" 1)"
            record "$workload.gib-all" "$peer" "$(per "$bytes" "$all" 2^30)"
            record "$workload.rps-all" "$peer" "$(per "$requests" "$all" 1)"
        done
    done
}

# wrk's own summary rounds to two digits in binary units; this prints the raw counts.
write_wrk_report() {
    cat >"$WORK/report.lua" <<'EOF'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %f %d\n", summary.bytes, summary.requests,
    summary.duration / 1e6, e.connect + e.read + e.write + e.timeout + e.status))
end
EOF
}

CLK_TCK=$(getconf CLK_TCK)

# --- workloads -------------------------------------------------------------------------

workload_blob() {
    local size connections peer w label
    local peers=(regmirror nginx-files nginx-files-auto distribution)
    for size in 1m 64m; do
        for peer in "${peers[@]}"; do check_blob "$peer" "$(blob_path "$size")"; done
        for connections in 16 64; do
            w=blob-$size-c$connections
            log "cached blob $size, $connections connections"
            wrk_rounds "$w" "$connections" "$(blob_path "$size")" "" "${peers[@]}"
            label="cached blob ${size%m} MiB, $connections conns"
            compare "$label (GiB/s)" "$w.gib" nginx-files 2 ">= 0.9x" "v >= 0.9"
            compare "$label (GiB/s)" "$w.gib" nginx-files-auto 2
            compare "$label (GiB/s)" "$w.gib" distribution 2 ">= 1.5x" "v >= 1.5"
            compare "$label (GiB per CPU-second: server)" "$w.gib-cpu" nginx-files 2
            compare "$label (GiB per CPU-second: server)" "$w.gib-cpu" distribution 2
            compare "$label (GiB per CPU-second: server + wrk)" "$w.gib-all" nginx-files 2
            compare "$label (GiB per CPU-second: server + wrk)" "$w.gib-all" distribution 2
        done
    done
}

workload_manifest() {
    local kind path peer w label
    local peers=(regmirror nginx-cache distribution)
    for kind in tag digest; do
        path=/v2/$SMALL/manifests/$([[ $kind == tag ]] && echo 1m || echo "$SMALL_MANIFEST")
        for peer in "${peers[@]}"; do
            curl -fsS -o /dev/null -H "Accept: $MANIFEST_ACCEPT" "http://$(addr_of "$peer")$path"
        done
        # A cache that does not cache would be measured as a pass-through: make sure it hits.
        curl -fsS -D - -o /dev/null -H "Accept: $MANIFEST_ACCEPT" "http://$(addr_of nginx-cache)$path" |
            grep -i '^x-cache-status: HIT' >/dev/null || die "nginx proxy_cache does not cache manifests by $kind"
        w=manifest-$kind
        log "cached manifest by $kind, 32 connections"
        wrk_rounds "$w" 32 "$path" "Accept: $MANIFEST_ACCEPT" "${peers[@]}"
        label="cached manifest by $kind, 32 conns"
        compare "$label (req/s)" "$w.rps" nginx-cache 0 ">= 1.0x" "v >= 1.0"
        compare "$label (req/s)" "$w.rps" distribution 0
        compare "$label (req per CPU-second: server)" "$w.rps-cpu" nginx-cache 0
        compare "$label (req per CPU-second: server + wrk)" "$w.rps-all" nginx-cache 0
    done
}

# The multi-layer image with skopeo, through a regmirror restarted on an empty cache before
# each run, against the same pull straight from the upstream.
workload_cold_pull() {
    local out=$WORK/tmp/pull round json name seconds
    local pull="skopeo --insecure-policy copy -q --src-tls-verify=false"
    local via_mirror=(--prepare "set -e; fresh regmirror; rm -rf $out"
        -n regmirror "$pull docker://$(addr_of regmirror)/$MULTI:256m dir:$out")
    local direct=(--prepare "rm -rf $out" -n upstream "$pull docker://$(addr_of upstream)/$MULTI:256m dir:$out")
    log "cold pull of $MULTI (4x64 MiB) with skopeo, $COLD_ROUNDS rounds"
    for ((round = 1; round <= COLD_ROUNDS; round++)); do
        json=$WORK/tmp/hyperfine-$round.json
        if ((round % 2)); then set -- "${via_mirror[@]}" "${direct[@]}"; else set -- "${direct[@]}" "${via_mirror[@]}"; fi
        hyperfine --shell=bash --runs 1 --style none --export-json "$json" "$@" >/dev/null
        while read -r name seconds; do
            record cold-pull "$name" "$seconds"
        done < <(jq -r '.results[] | "\(.command) \(.mean)"' "$json")
        # The mirror was started on an empty cache for this round's pull and did nothing else.
        record cold-pull-cpu regmirror "$(per "$(cpu_ticks regmirror)" "$CLK_TCK" 1)"
    done
    compare "cold pull 4x64 MiB image, skopeo (s)" cold-pull upstream 2 "<= 1.05x" "v <= 1.05"
    absolute "cold pull 4x64 MiB image: regmirror's CPU time (s)" "$(results cold-pull-cpu regmirror)" 2 – ""
}

# first_byte_ms URL: milliseconds to the first byte of the answer (the whole body is read).
first_byte_ms() {
    curl -fsS -o /dev/null -w '%{time_starttransfer}' "$1" | awk '{ printf "%.2f\n", $1 * 1000 }'
}

# fresh_warm NAME: NAME on an empty cache, having just answered a manifest, so its upstream
# connection is open as in a real pull (which fetches the manifest before the layers).
fresh_warm() {
    fresh "$1"
    curl -fsS -o /dev/null -H "Accept: $MANIFEST_ACCEPT" "http://$(addr_of "$1")/v2/$LARGE/manifests/64m"
}

workload_cold_first_byte() {
    local round name path order
    path=$(blob_path 64m)
    log "cold blob first byte, $FIRST_BYTE_ROUNDS rounds"
    for ((round = 1; round <= FIRST_BYTE_ROUNDS; round++)); do
        mapfile -t order < <(in_round_order "$round" regmirror upstream)
        for name in "${order[@]}"; do
            [[ $name == upstream ]] || fresh_warm regmirror
            record cold-first-byte "$name" "$(first_byte_ms "http://$(addr_of "$name")$path")"
        done
    done
    paste "$(results cold-first-byte regmirror)" "$(results cold-first-byte upstream)" |
        awk '{ print $1 - $2 }' >"$(results cold-first-byte delta)"
    compare "cold 64 MiB blob, first byte (ms)" cold-first-byte upstream 1
    absolute "cold first byte, regmirror − upstream (ms)" "$(results cold-first-byte delta)" 1 "<= 5 ms" "v <= 5"
}

# upstream_gets PATH: how many GETs of PATH the upstream has answered so far.
upstream_gets() { grep -cF "\"GET $1 HTTP" "$WORK/logs/upstream.log" || true; }

# Eight clients ask an empty cache for the same 64 MiB blob at once (one curl running 8
# transfers, so they start within microseconds of each other). Counts the upstream GETs this
# caused, and how much later than the first client the last one got its first byte.
workload_concurrent() {
    local peers=(regmirror distribution nginx-cache) round peer path url before out i order transfers
    path=$(blob_path 64m)
    log "8 concurrent cold pulls, $CONCURRENT_ROUNDS rounds"
    for ((round = 1; round <= CONCURRENT_ROUNDS; round++)); do
        mapfile -t order < <(in_round_order "$round" "${peers[@]}")
        for peer in "${order[@]}"; do
            fresh_warm "$peer"
            before=$(upstream_gets "$path")
            url=http://$(addr_of "$peer")$path
            transfers=()
            for ((i = 0; i < 8; i++)); do transfers+=(-o /dev/null "$url"); done
            out=$(curl -fsS --no-progress-meter --parallel --parallel-immediate --parallel-max 8 \
                -w '%{time_starttransfer} %{http_code} %{size_download}\n' "${transfers[@]}")
            [[ $(grep -c " 200 $LARGE_BYTES\$" <<<"$out") == 8 ]] || die "$peer failed a concurrent pull: $out"
            sleep 0.5 # the upstream logs a request once its answer is complete
            record concurrent-gets "$peer" $(($(upstream_gets "$path") - before))
            record concurrent-lag "$peer" "$(awk 'NR == 1 || $1 < lo { lo = $1 } $1 > hi { hi = $1 }
                END { printf "%.1f\n", (hi - lo) * 1000 }' <<<"$out")"
        done
    done
    absolute "8 concurrent cold pulls: upstream GETs of the blob (worst round)" \
        "$(results concurrent-gets regmirror)" 0 "1" "v == 1" maximum
    compare "8 concurrent cold pulls: upstream GETs of the blob" concurrent-gets distribution 0
    compare "8 concurrent cold pulls: upstream GETs of the blob" concurrent-gets nginx-cache 0
    absolute "8 concurrent cold pulls: last first byte − first (ms)" \
        "$(results concurrent-lag regmirror)" 1 "<= 10 ms" "v <= 10"
    compare "8 concurrent cold pulls: last first byte − first (ms)" concurrent-lag distribution 1
    compare "8 concurrent cold pulls: last first byte − first (ms)" concurrent-lag nginx-cache 1
}

# rss_under_load NAME: the peak RSS of NAME, freshly started on its warm cache, while 256
# connections download the cached 64 MiB blob; records the throughput too.
rss_under_load() {
    local name=$1 pid url wrk_pid i rss peak=0
    restart "$name"
    check_blob "$name" "$(blob_path 64m)"
    url=http://$(addr_of "$name")$(blob_path 64m)
    pid=$(pid_of "$name")
    WRK_SECONDS=$RSS_SECONDS wrk_run "$url" 256 >"$WORK/tmp/rss-wrk" &
    wrk_pid=$!
    for ((i = 0; i < RSS_SECONDS * 10 + 300; i++)); do
        kill -0 "$wrk_pid" 2>/dev/null || break
        rss=$(awk '/^VmRSS/ { print $2 }' "/proc/$pid/status")
        ((rss <= peak)) || peak=$rss
        sleep 0.1
    done
    wait "$wrk_pid"
    record rss-sampled "$name" "$((peak / 1024))"
    record rss-hwm "$name" "$(awk '/^VmHWM/ { print int($2 / 1024) }' "/proc/$pid/status")"
    record rss-throughput "$name" "$(per "$(cut -d' ' -f1 "$WORK/tmp/rss-wrk")" "$(cut -d' ' -f3 "$WORK/tmp/rss-wrk")" 2^30)"
}

workload_rss() {
    log "RSS with 256 concurrent downloads of a cached 64 MiB blob, ${RSS_SECONDS}s each"
    rss_under_load regmirror
    rss_under_load distribution
    absolute "RSS peak (VmHWM), 256 downloads of a cached 64 MiB blob (MiB)" \
        "$(results rss-hwm regmirror)" 0 "< 64 MiB" "v < 64" maximum
    compare "RSS peak (VmHWM), 256 downloads of a cached 64 MiB blob (MiB)" rss-hwm distribution 0
    compare "throughput at 256 conns, cached 64 MiB (GiB/s)" rss-throughput distribution 2
}

# make_blob_cache DIR COUNT: COUNT small, genuinely valid blobs in regmirror's layout.
make_blob_cache() {
    python3 - "$1" "$2" <<'EOF'
import hashlib, os, sys
root, count = sys.argv[1], int(sys.argv[2])
for n in range(count):
    data = b"regmirror bench blob %d\n" % n
    hex_digest = hashlib.sha256(data).hexdigest()
    shard = os.path.join(root, "blobs", "sha256", hex_digest[:2])
    os.makedirs(shard, exist_ok=True)
    with open(os.path.join(shard, hex_digest), "wb") as f:
        f.write(data)
EOF
}

now_ns() { date +%s%N; }

# Time from exec to the `listening` line and to the first 200 from /readyz (polled every
# 10 ms), with STARTUP_BLOBS blobs in the cache. The page cache is warm after the generation:
# this is a restart, not a boot.
workload_startup() {
    local cache=$WORK/data/startup port round t0 listening ready i from
    log "startup with $STARTUP_BLOBS cached blobs"
    make_blob_cache "$cache" "$STARTUP_BLOBS"
    port=$(port_of regmirror)
    for ((round = 1; round <= STARTUP_ROUNDS; round++)); do
        stop_service regmirror
        from=$(log_lines regmirror)
        listening='' ready=''
        t0=$(now_ns)
        spawn regmirror "$REGMIRROR_BIN" serve --listen "127.0.0.1:$port" --cache-dir "$cache" \
            --upstream "http://$(addr_of upstream)"
        for ((i = 0; i < 6000 && ${#ready} == 0; i++)); do
            if [[ -z $listening ]] && sed -n "$((from + 1)),\$p" "$WORK/logs/regmirror.log" | grep 'listening addr=' >/dev/null; then
                listening=$(now_ns)
            fi
            if curl -fs -o /dev/null "http://127.0.0.1:$port/readyz"; then ready=$(now_ns); else sleep 0.01; fi
        done
        [[ -n $ready ]] || die "regmirror did not become ready with $STARTUP_BLOBS blobs"
        record startup-listening regmirror "$(((${listening:-$ready} - t0) / 1000000))"
        record startup-ready regmirror "$(((ready - t0) / 1000000))"
    done
    absolute "startup, $STARTUP_BLOBS cached blobs: \`listening\` logged (ms)" "$(results startup-listening regmirror)" 0 – ""
    absolute "startup, $STARTUP_BLOBS cached blobs: /readyz answers (ms)" "$(results startup-ready regmirror)" 0 "< 2000 ms" "v < 2000"
    stop_service regmirror
    rm -rf "$cache"
    start_regmirror "$port"
}

# --- main ------------------------------------------------------------------------------

require_tools() {
    local tool missing=()
    for tool in wrk hyperfine nginx docker-registry skopeo umoci curl jq python3 ss; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    ((${#missing[@]} == 0)) ||
        die "missing ${missing[*]}: apt-get install -y wrk hyperfine nginx docker-registry skopeo umoci curl jq python3 iproute2"
}

build() {
    if [[ -n ${REGMIRROR_BIN:-} ]]; then
        log "measuring $REGMIRROR_BIN (no build)"
        BUILT_FROM="$REGMIRROR_BIN"
        return
    fi
    log "cargo build --release"
    (cd "$REPO" && cargo build --release --quiet)
    REGMIRROR_BIN=$(cd "$REPO" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)/release/regmirror
    BUILT_FROM=$(source_version)
}

# source_version: the commit the build came from, and whether the sources differ from it.
source_version() {
    local rev
    rev=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null) || {
        echo "$REPO (not a git checkout)"
        return
    }
    git -C "$REPO" diff --quiet HEAD -- src Cargo.toml Cargo.lock || rev+=" + uncommitted changes"
    echo "$rev"
}

describe_run() {
    echo "# regmirror benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- machine: $(nproc) cores, $(sed -n 's/^model name\s*: //p; T; q' /proc/cpuinfo), kernel $(uname -r)"
    echo "- regmirror: release build of $BUILT_FROM, RUST_LOG=$RUST_LOG"
    echo "- peers: $(docker-registry --version | cut -d' ' -f2-), nginx $(nginx -v 2>&1 | cut -d/ -f2)" \
        "(nginx-files: worker_processes 1, nginx-files-auto: auto = $(nproc))"
    echo "- rounds: wrk $ROUNDS x ${WRK_SECONDS}s (-t2), cold pull $COLD_ROUNDS, first byte $FIRST_BYTE_ROUNDS," \
        "concurrent $CONCURRENT_ROUNDS, startup $STARTUP_ROUNDS; RSS load ${RSS_SECONDS}s"
    echo "- figures: median [min–max] over the rounds; ratio = regmirror / peer, taken per round"
    echo
    echo "| workload | regmirror | peer | peer's figure | ratio | target | met |"
    echo "|---|---|---|---|---|---|---|"
}

main() {
    local service workload started
    started=$(date +%s)
    require_tools
    build
    [[ -x $REGMIRROR_BIN ]] || die "no regmirror binary at $REGMIRROR_BIN"
    export REGMIRROR_BIN
    write_wrk_report
    for service in upstream distribution nginx-files nginx-files-auto nginx-cache regmirror; do
        "start_${service//-/_}" 0
    done
    make_fixtures
    describe_run >"$TABLE"
    for workload in $ONLY; do
        declare -F "workload_${workload//-/_}" >/dev/null || die "no workload $workload"
        "workload_${workload//-/_}"
    done
    log "done in $(($(date +%s) - started)) s"
    echo
    cat "$TABLE"
}

main "$@"
