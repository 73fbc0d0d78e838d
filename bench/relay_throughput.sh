#!/usr/bin/env bash
# bench/relay_throughput.sh - how fast a full queue drains to one SMTP
# destination: slimta's Queue(SqliteStorage) + StaticSmtpRelay against
# Postfix delivering its own queue, to the same smtp-sink, in one run.
#
#   bash bench/relay_throughput.sh                 # N=5000, 3 runs each: a few minutes
#   N=500 RUNS=1 QUIET_WAIT=0 bash bench/relay_throughput.sh   # smoke test (no quiet
#       check: it disturbs anyone else's benchmark; look with pgrep first)
#   ROWS="slimta slimta-nolog" bash bench/relay_throughput.sh
#
# One smtp-sink (Postfix's test server: accepts and discards, PIPELINING
# advertised, no CHUNKING) on 127.0.0.1:$SINK_PORT, pinned to CPU $SINK_CPU.
# Both senders are pinned to CPU $SENDER_CPU: the whole private Postfix
# instance (master and every child it spawns) and slimta's process (with its
# SQLite threads). Each run of a row:
#
#   postfix  untimed: fill the instance's queue with N messages through its
#            smtpd (smtp-source, 20 sessions, 1 KB of body each), every one
#            parked in the hold queue (check_client_access static:HOLD).
#            timed:   postsuper -H ALL; postqueue -f; until no message file
#            is left in maildrop/incoming/active/deferred/hold (polled every
#            5 ms). Then the log must show N "status=sent" and nothing else.
#   slimta   untimed: a fresh SqliteStorage (synchronous=FULL, the default)
#            filled with N copies of one message that Postfix held (the
#            same bytes, its Received: line included), by a Queue without
#            relay. timed: Queue(storage, StaticSmtpRelay(sink)) starts
#            (opens the file, loads the schedule, delivers) until
#            queue.join(); then queue.stats() must show an empty storage and
#            the sink must have accepted N messages.
#
# Rows alternate (postfix, slimta, postfix, slimta, ...), each after a quiet
# check (bench/relay_bench.py quiet). Then bench/relay_bench.py summarize
# prints median (min-max) msgs/s per row and the ratio slimta / postfix.
#
# Environment (defaults in brackets):
#   N [5000]  RUNS [3]  CONCURRENCY [20]: Postfix's
#             default_destination_concurrency_limit and slimta's relay_pool
#             and pool_size
#   ROWS ["postfix slimta"]; also slimta-nolog (no logging at all; the
#             slimta row logs every delivery at INFO to a file, as the daemon
#             logs and as Postfix logs to its maillog), slimta-asyncio (the
#             stdlib loop; the slimta rows use uvloop when it imports)
#   RESULTS_DIR [/tmp/slimta-relay-bench]  PF_ROOT [$RESULTS_DIR/postfix]
#   SINK_PORT [2530]  PF_PORT [2531] (the instance's smtpd, for filling)
#   SINK_CPU [0]  SENDER_CPU [1]  PIN [1 with two CPUs or more]
#   QUIET_WAIT [600] s to wait for a quiet machine before each timed run;
#             QUIET_BUSY [15] % of all CPUs; QUIET_STRICT [0]: 1 aborts when
#             the machine does not get quiet (else the run goes on, and
#             env.txt says so)
#   STEAL_MAX [5] %: a run during which the hypervisor stole more of the
#             CPUs is recorded as disturbed (not counted) and done again, at
#             most RETRIES [2] times
#   PYTHON [python3]  CHECK_TARGETS [0]: 1 makes the exit status 1 when the
#             ratio is below 1.0
# Needs root (a private Postfix instance, smtp-sink -u nobody), Postfix's
# programs (postfix, postsuper, postqueue, postcat, smtp-sink, smtp-source)
# and taskset.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
N=${N:-5000}
RUNS=${RUNS:-3}
CONCURRENCY=${CONCURRENCY:-20}
ROWS=${ROWS:-"postfix slimta"}
RESULTS_DIR=${RESULTS_DIR:-/tmp/slimta-relay-bench}
PF_ROOT=${PF_ROOT:-$RESULTS_DIR/postfix}
SINK_PORT=${SINK_PORT:-2530}
PF_PORT=${PF_PORT:-2531}
SINK_CPU=${SINK_CPU:-0}
SENDER_CPU=${SENDER_CPU:-1}
QUIET_WAIT=${QUIET_WAIT:-600}
QUIET_BUSY=${QUIET_BUSY:-15}
STEAL_MAX=${STEAL_MAX:-5}
RETRIES=${RETRIES:-2}
PYTHON=${PYTHON:-python3}
ETC=$PF_ROOT/etc
QDIR=$PF_ROOT/queue
DB=$RESULTS_DIR/slimta/queue.db
TEMPLATE=$RESULTS_DIR/message.eml
TSV=$RESULTS_DIR/results.tsv
SENDER=bench-from@example.com
RCPT=bench-to@example.org
BENCH="$HERE/relay_bench.py"
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}   # this checkout's slimta

say() { printf '== relay bench: %s\n' "$*" >&2; }
die() { printf '== relay bench: ERROR: %s\n' "$*" >&2; exit 2; }

case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH=$PATH:/usr/sbin ;; esac
[ "$(id -u)" = 0 ] || die "needs root (private Postfix instance)"
for p in postfix postsuper postqueue postcat postconf smtp-sink smtp-source taskset; do
    command -v "$p" > /dev/null || die "$p missing (apt-get install postfix util-linux)"
done
if [ -z "${PIN:-}" ]; then
    if [ "$(nproc)" -ge 2 ]; then PIN=1; else PIN=0; say "one CPU: not pinning"; fi
fi
on_sender() { if [ "$PIN" = 1 ]; then taskset -c "$SENDER_CPU" "$@"; else "$@"; fi; }
on_sink() { if [ "$PIN" = 1 ]; then taskset -c "$SINK_CPU" "$@"; else "$@"; fi; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for var in SINK_PORT PF_PORT; do
    port_busy "${!var}" && die "port ${!var} ($var) is in use; set $var"
done

# ---- the private Postfix instance ---------------------------------------------------
pf_setup() {
    mkdir -p "$ETC" "$QDIR" "$PF_ROOT/data"
    chown root:root "$QDIR"
    chown postfix:postfix "$PF_ROOT/data"
    cat > "$ETC/main.cf" <<EOF
# generated by bench/relay_throughput.sh
compatibility_level = 3.6
config_directory = $ETC
queue_directory = $QDIR
data_directory = $PF_ROOT/data
command_directory = $(postconf -dh command_directory)
daemon_directory = $(postconf -dh daemon_directory)
meta_directory = $(postconf -dh meta_directory)
shlib_directory = $(postconf -dh shlib_directory)
mail_owner = postfix
setgid_group = postdrop
maillog_file_prefixes = $PF_ROOT
maillog_file = $PF_ROOT/maillog
myhostname = bench.local
mydomain = bench.local
myorigin = bench.local
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# nothing is delivered locally: every recipient goes to the relayhost
mydestination =
relay_domains =
alias_maps =
alias_database =
local_recipient_maps =
local_transport = error:no local delivery
virtual_transport = error:no local delivery
biff = no
smtpd_peername_lookup = no
# the destination: the one smtp-sink, no DNS
relayhost = [127.0.0.1]:$SINK_PORT
default_transport = smtp
relay_transport = smtp
smtp_dns_support_level = disabled
smtp_tls_security_level = none
smtp_helo_name = bench.local
default_destination_concurrency_limit = $CONCURRENCY
# the defaults, stated: slow start at 5, connection caching when a
# destination has a backlog, reuse without a count limit
initial_destination_concurrency = 5
smtp_connection_cache_on_demand = yes
smtp_connection_reuse_count_limit = 0
# filling: every message accepted by smtpd is parked in the hold queue
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = check_client_access static:HOLD, permit_mynetworks, reject
in_flow_delay = 0
EOF
    cat > "$ETC/master.cf" <<EOF
# generated by bench/relay_throughput.sh: no chroot, smtpd only on 127.0.0.1:$PF_PORT
127.0.0.1:$PF_PORT inet n -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
    postfix -c "$ETC" check || die "postfix check failed for $ETC"
}

pf_clear_queue() {  # the instance must be stopped
    local q
    for q in maildrop incoming active deferred hold corrupt defer bounce trace flush; do
        [ -d "$QDIR/$q" ] && find "$QDIR/$q" -type f -delete
    done
}

pf_count() { (cd "$QDIR" && find "$@" -type f 2> /dev/null | wc -l); }
sent_count() { grep -c 'status=sent' "$PF_ROOT/maillog" 2> /dev/null || true; }
other_status_count() { grep -Ec 'status=(deferred|bounced|expired)' "$PF_ROOT/maillog" 2> /dev/null || true; }

# fill the hold queue with N messages (untimed); exits non-zero on a shortfall
pf_fill() {
    local before
    before=$(pf_count hold)
    on_sink timeout 600 smtp-source -M bench.local -f "$SENDER" -t "$RCPT" -s 20 -l 1024 \
        -m "$N" "127.0.0.1:$PF_PORT" || return 1
    local held
    held=$(pf_count hold)
    [ $((held - before)) = "$N" ] || { say "postfix fill: $((held - before)) held, want $N"; return 1; }
}

# one held message, as Postfix will send it: the template for slimta's copies
pf_template() {
    local id
    id=$(postqueue -c "$ETC" -j | "$PYTHON" -c 'import json, sys; print(json.loads(sys.stdin.readline())["queue_id"])') \
        || return 1
    postcat -c "$ETC" -hb -q "$id" | grep -v '^\*\*\* ' > "$TEMPLATE"
    [ -s "$TEMPLATE" ]
}

# ---- start and stop -----------------------------------------------------------------
SINK_PID=
cleanup() {
    [ -n "$SINK_PID" ] && kill "$SINK_PID" 2> /dev/null
    [ -f "$QDIR/pid/master.pid" ] && postfix -c "$ETC" stop > /dev/null 2>&1
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$RESULTS_DIR" "$(dirname "$DB")"
rm -f "$TSV" "$RESULTS_DIR"/*.log "$PF_ROOT/maillog"
postfix -c "$ETC" status > /dev/null 2>&1 && postfix -c "$ETC" stop > /dev/null 2>&1
pf_setup
pf_clear_queue
: > "$PF_ROOT/maillog"

sink_cmd=(smtp-sink -u nobody "127.0.0.1:$SINK_PORT" 1024)
[ "$PIN" = 1 ] && sink_cmd=(taskset -c "$SINK_CPU" "${sink_cmd[@]}")  # taskset execs: one pid
"${sink_cmd[@]}" > "$RESULTS_DIR/sink.log" 2>&1 &
SINK_PID=$!
on_sender postfix -c "$ETC" start > "$RESULTS_DIR/postfix-start.log" 2>&1 \
    || die "postfix start failed: $(cat "$RESULTS_DIR/postfix-start.log")"
for _ in $(seq 50); do port_busy "$SINK_PORT" && port_busy "$PF_PORT" && break; sleep 0.1; done
port_busy "$SINK_PORT" || die "smtp-sink did not start"
port_busy "$PF_PORT" || die "Postfix smtpd did not start"

has_uvloop=0; "$PYTHON" -c 'import uvloop' 2> /dev/null && has_uvloop=1
{
    echo "date: $(date -u +%FT%TZ)"
    echo "kernel: $(uname -srm)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)"
    if [ "$PIN" = 1 ]; then
        echo "pinning: smtp-sink on CPU $SINK_CPU; Postfix instance and slimta on CPU $SENDER_CPU (taskset)"
    else
        echo "pinning: none"
    fi
    echo "slimta: $(git -C "$ROOT" describe --always --dirty 2> /dev/null || echo unknown)," \
        "$("$PYTHON" --version 2>&1), sqlite $("$PYTHON" -c 'import sqlite3; print(sqlite3.sqlite_version)')," \
        "uvloop $([ $has_uvloop = 1 ] && "$PYTHON" -c 'import uvloop; print(uvloop.__version__)' || echo -)"
    echo "postfix: $(postconf -dh mail_version)"
    echo "messages: N=$N per run, $RUNS runs per row; concurrency $CONCURRENCY" \
        "(Postfix default_destination_concurrency_limit; slimta relay_pool and pool_size)"
    echo "rows: $ROWS"
} > "$RESULTS_DIR/env.txt"
cat "$RESULTS_DIR/env.txt" >&2

wait_quiet() {
    [ "$QUIET_WAIT" -gt 0 ] 2> /dev/null || return 0
    on_sender "$PYTHON" "$BENCH" quiet --max-wait "$QUIET_WAIT" --busy "$QUIET_BUSY" && return 0
    [ "${QUIET_STRICT:-0}" = 1 ] && die "the machine did not get quiet in $QUIET_WAIT s"
    echo "NOT QUIET before a run of $1 (run $2): see $RESULTS_DIR/run.log" >> "$RESULTS_DIR/env.txt"
}

# the template needs one held message: fill Postfix's queue before anything else
pf_filled=0
ensure_template() {
    [ -s "$TEMPLATE" ] && return 0
    pf_fill || die "filling Postfix's queue failed"
    pf_filled=1
    pf_template || die "could not extract a held message with postcat"
    say "message template: $(wc -c < "$TEMPLATE") bytes (LF), from Postfix's hold queue"
}
rm -f "$TEMPLATE"
ensure_template

run_postfix() {  # $1 = run number
    if [ "$pf_filled" != 1 ]; then
        pf_fill || { say "postfix fill failed"; return 1; }
    fi
    pf_filled=0
    wait_quiet postfix "$1"
    local sent0 other0 out
    sent0=$(sent_count); other0=$(other_status_count)
    out=$(on_sender "$PYTHON" "$BENCH" postfix-run --etc "$ETC" --queue "$QDIR" -n "$N")
    sleep 1  # let postlogd write the last lines
    local sent=$(($(sent_count) - sent0)) other=$(($(other_status_count) - other0))
    out=$("$PYTHON" -c '
import json, sys
r = json.loads(sys.argv[1]); sent, other = int(sys.argv[2]), int(sys.argv[3])
r["delivered"], r["not_sent"] = sent, other
r["rate"] = round(sent / r["seconds"], 1)
r["ok"] = r["ok"] and sent == r["n"] and other == 0
print(json.dumps(r))' "$out" "$sent" "$other")
    LAST_JSON=$out
}

run_slimta() {  # $1 = run number, $2 = row name
    local opts=() log=
    case $2 in
        slimta) log=$RESULTS_DIR/slimta-run$1.log; rm -f "$log"; opts+=(--log "$log") ;;
        slimta-nolog) ;;
        slimta-asyncio) log=$RESULTS_DIR/slimta-asyncio-run$1.log; rm -f "$log"
                        opts+=(--log "$log" --no-uvloop) ;;
        *) say "unknown row $2"; return 1 ;;
    esac
    on_sender "$PYTHON" "$BENCH" fill --db "$DB" --template "$TEMPLATE" -n "$N" \
        --sender "$SENDER" --rcpt "$RCPT" || { say "slimta fill failed"; return 1; }
    wait_quiet "$2" "$1"
    local out
    out=$(on_sender "$PYTHON" "$BENCH" deliver --db "$DB" --port "$SINK_PORT" -n "$N" \
        --relay-pool "$CONCURRENCY" --pool-size "$CONCURRENCY" "${opts[@]}")
    [ -n "$out" ] || { say "slimta deliver printed nothing"; return 1; }
    LAST_JSON=$("$PYTHON" -c 'import json, sys; r = json.loads(sys.argv[1]); r["row"] = sys.argv[2]; print(json.dumps(r))' "$out" "$2")
    rm -f "$DB" "$DB-wal" "$DB-shm"
}

# one run of a row; a run during which the hypervisor stole more than
# STEAL_MAX % of the CPUs is kept in results.tsv as not ok and done again
# (at most RETRIES times)
run_row() {  # $1 = run number, $2 = row
    local try verdict
    for try in $(seq $((RETRIES + 1))); do
        LAST_JSON=
        case $2 in
            postfix) run_postfix "$1" ;;
            slimta*) run_slimta "$1" "$2" ;;
            *) say "unknown row $2"; return 1 ;;
        esac
        [ -n "$LAST_JSON" ] || return 1
        LAST_JSON=$("$PYTHON" -c '
import json, sys
r = json.loads(sys.argv[1])
if r.get("steal", 0) > float(sys.argv[2]):
    r["ok"] = False
    r["disturbed"] = "steal %s %%" % r["steal"]
print(json.dumps(r))' "$LAST_JSON" "$STEAL_MAX")
        printf '%s\t%s\t%s\n' "$1" "$2" "$LAST_JSON" >> "$TSV"
        say "$2 run $1: $LAST_JSON"
        case $LAST_JSON in *'"disturbed"'*) ;; *) break ;; esac
        if [ "$try" -le "$RETRIES" ]; then
            say "$2 run $1: more than $STEAL_MAX % steal time, once more"
        else
            say "$2 run $1: more than $STEAL_MAX % steal time $try times: no result"
        fi
    done
    case $LAST_JSON in *'"ok": true'*) return 0 ;; *) return 1 ;; esac
}

failed=0
{
for run in $(seq "$RUNS"); do
    for row in $ROWS; do
        run_row "$run" "$row" || failed=1
    done
done
} 2> >(tee -a "$RESULTS_DIR/run.log" >&2)

[ -s "$TSV" ] || die "no results"
check=; [ "${CHECK_TARGETS:-0}" = 1 ] && check=--check
"$PYTHON" "$BENCH" summarize "$TSV" $check > "$RESULTS_DIR/summary.md"
rc=$?
echo
cat "$RESULTS_DIR/env.txt"
echo
cat "$RESULTS_DIR/summary.md"
say "results in $RESULTS_DIR (results.tsv, summary.md, env.txt, run.log, logs)"
[ "$failed" = 0 ] || exit 1
exit "$rc"
