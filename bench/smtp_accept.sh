#!/usr/bin/env bash
# bench/smtp_accept.sh - SMTP accept rate of slimta's SmtpEdge against
# aiosmtpd, and of SmtpEdge storing into a durable SQLite queue against a
# Postfix that only queues, in one run, on loopback, with Postfix's
# smtp-source as the client.
#
#   bash bench/smtp_accept.sh
#   SCENARIOS="s20_1k_keep" RUNS=5 bash bench/smtp_accept.sh
#   SERVERS="aiosmtpd aiosmtpd+uvloop SmtpEdge+uvloop SmtpEdge+asyncio" bash bench/smtp_accept.sh
#   SERVERS="postfix-hold SmtpEdge+sqlite" bash bench/smtp_accept.sh
#   SERVERS="postfix-hold SmtpEdge+sqlite SmtpEdge+postgres" SCENARIOS=s20_1k_keep \
#       bash bench/smtp_accept.sh
#
# Each server is measured by the shared harness ../shared/bench/smtp_accept.sh
# (seen from the repository root): server pinned to CPU 1, smtp-source to
# CPU 0, one swaks check, a warm-up, then $RUNS timed runs per scenario.
# Afterwards this prints the harness's summary tables and bench/ratios.py's
# tables of ratios of the medians: SmtpEdge / aiosmtpd and
# SmtpEdge+sqlite / postfix-hold (for the baselines that were measured).
#
# Environment (defaults in brackets):
#   SERVERS   ["aiosmtpd SmtpEdge"]; known rows: aiosmtpd, aiosmtpd+uvloop,
#             SmtpEdge (= SmtpEdge+uvloop when uvloop imports, else
#             SmtpEdge+asyncio), SmtpEdge+uvloop, SmtpEdge+asyncio;
#             postfix-hold (the shared postfix_instance.sh, PF_MODE=hold:
#             every message fsynced into Postfix's queue and held),
#             SmtpEdge+sqlite (bench/queue_sink.py: SmtpEdge + Queue without
#             relay + SqliteStorage, synchronous=FULL; its default loop),
#             SmtpEdge+sqlite+asyncio (the same with --no-uvloop),
#             SmtpEdge+postgres (bench/queue_sink.py --storage postgres:
#             the same with PostgresStorage on PG_DSN, in schema PG_SCHEMA),
#             SmtpEdge+postgres+asyncio (the same with --no-uvloop),
#             SmtpEdge+postgres+pinned (SmtpEdge+postgres with
#             --pin-backends: the server processes of the sink's connections
#             pinned to SERVER_CPUS too; root, server on this host)
#   SCENARIOS ["s20_1k_keep s20_100k_keep"]   (the harness also knows
#             s20_1k_conn and s1_1k_keep)
#   RUNS [3]   RESULTS_DIR [/tmp/slimta-bench]   KEEP_RESULTS [0]: 1 appends
#             to an existing results.tsv instead of starting a new one
#   PYTHON [python3]: runs SmtpEdge (with this checkout's src/ first on
#             sys.path) and aiosmtpd when it can import aiosmtpd
#   AIOSMTPD_PYTHON: the Python for aiosmtpd [PYTHON if it has aiosmtpd,
#             else /tmp/benchvenv/bin/python from the shared setup.sh]
#   EDGE_SCALE_1K [3]  EDGE_SCALE_100K [8]: SmtpEdge+uvloop/+asyncio
#             rows send this many times more messages per run than aiosmtpd
#             (20,000 x 3 of 1 KB, 3,000 x 8 of 100 KB), so that their runs
#             last seconds too; rates are per second either way. The
#             SmtpEdge+sqlite rows send the same counts as postfix-hold
#             (the database holds at most one run: 3,000 x 100 KB)
#   QUEUE_DB [$RESULTS_DIR/queue/queue.db]: the SmtpEdge+sqlite database,
#             removed before and after its row; before each timed run
#             (untimed, like Postfix's reset) "queue_sink.py --reset"
#             deletes every stored message and truncates the WAL (and
#             makes the sink log its commit batch sizes for the run before)
#   PG_DSN [postgresql://127.0.0.1:5432/test]  PG_SCHEMA [slimta_bench]:
#             the SmtpEdge+postgres server and schema; the schema is dropped
#             before and after the row, and before each timed run
#             "queue_sink.py --storage postgres --reset" TRUNCATEs its
#             messages table and CHECKPOINTs (untimed, as above). The server
#             is used as it is configured (its synchronous_commit, printed in
#             env.txt and the sink's log, decides durability) and is never
#             restarted
#   PF_ROOT [/tmp/pfbench]: the private Postfix instance (set up by
#             postfix_instance.sh; needs root)
#   SHARED_BENCH [../shared/bench]   CHECK_TARGETS [0]: 1 makes the exit
#             status 1 when a target ratio is missed
#   SMTPEDGE_CMD: replaces "python bench/slimta_sink.py" in the SmtpEdge
#             rows (it gets the same "--port N --uvloop|--no-uvloop"); only
#             for trying this script with a stand-in server
#   AIOSMTPD_PORT [2502]  EDGE_PORT [2510]  PF_PORT [2504]
#             QUEUE_PORT [2511]: when one is in use, a free port is picked
#             instead
#   PIN, SERVER_CPUS [1], CLIENT_CPUS [0], RUN_TIMEOUT, N_*, WARMUP_MSGS:
#             passed to the shared harness
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SHARED_BENCH=${SHARED_BENCH:-$ROOT/../shared/bench}
[ -d "$SHARED_BENCH" ] && SHARED_BENCH=$(cd "$SHARED_BENCH" && pwd)
HARNESS=$SHARED_BENCH/smtp_accept.sh
SUMMARIZE=$SHARED_BENCH/summarize.py

SERVERS=${SERVERS:-"aiosmtpd SmtpEdge"}
export SCENARIOS=${SCENARIOS:-"s20_1k_keep s20_100k_keep"}
export RUNS=${RUNS:-3}
export RESULTS_DIR=${RESULTS_DIR:-/tmp/slimta-bench}
export RESULTS_TSV=$RESULTS_DIR/results.tsv
PYTHON=${PYTHON:-python3}
EDGE_SCALE_1K=${EDGE_SCALE_1K:-3}
EDGE_SCALE_100K=${EDGE_SCALE_100K:-8}
AIOSMTPD_PORT=${AIOSMTPD_PORT:-2502}
EDGE_PORT=${EDGE_PORT:-2510}
PF_PORT=${PF_PORT:-2504}
QUEUE_PORT=${QUEUE_PORT:-2511}
QUEUE_DB=${QUEUE_DB:-$RESULTS_DIR/queue/queue.db}
PG_DSN=${PG_DSN:-postgresql://127.0.0.1:5432/test}
PG_SCHEMA=${PG_SCHEMA:-slimta_bench}
PFI=$SHARED_BENCH/servers/postfix_instance.sh

export N_S20_1K_KEEP=${N_S20_1K_KEEP:-20000} N_S20_1K_CONN=${N_S20_1K_CONN:-10000}
export N_S20_100K_KEEP=${N_S20_100K_KEEP:-3000} N_S1_1K_KEEP=${N_S1_1K_KEEP:-5000}

say() { printf '== bench: %s\n' "$*" >&2; }
die() { printf '== bench: ERROR: %s\n' "$*" >&2; exit 2; }

# ---- what the run needs ------------------------------------------------------
[ -f "$HARNESS" ] || die "shared harness not found: $HARNESS (set SHARED_BENCH)"
[ -f "$SUMMARIZE" ] || die "not found: $SUMMARIZE"
case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH=$PATH:/usr/sbin ;; esac
command -v smtp-source > /dev/null || die "smtp-source missing (apt-get install postfix)"
command -v swaks > /dev/null || die "swaks missing (apt-get install swaks)"
command -v taskset > /dev/null || die "taskset missing (util-linux)"
command -v "$PYTHON" > /dev/null || die "no $PYTHON"

if [ -z "${PIN:-}" ]; then
    if [ "$(nproc)" -ge 2 ]; then
        export PIN=1
    else
        say "only $(nproc) CPU: running unpinned (PIN=0); compare only within this run"
        export PIN=0
    fi
fi
export SERVER_CPUS=${SERVER_CPUS:-1} CLIENT_CPUS=${CLIENT_CPUS:-0}

has_module() { "$1" -c "import $2" > /dev/null 2>&1; }

if [ -z "${AIOSMTPD_PYTHON:-}" ]; then
    if has_module "$PYTHON" aiosmtpd; then
        AIOSMTPD_PYTHON=$PYTHON
    elif [ -x /tmp/benchvenv/bin/python ] && has_module /tmp/benchvenv/bin/python aiosmtpd; then
        AIOSMTPD_PYTHON=/tmp/benchvenv/bin/python
    fi
fi

# SmtpEdge runs from this checkout, whatever slimta is installed
EDGE_ENV="PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
has_module "$PYTHON" uvloop && EDGE_DEFAULT=SmtpEdge+uvloop || EDGE_DEFAULT=SmtpEdge+asyncio

# a port that nothing listens on: the one asked for, else one the kernel picks
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
    if ! port_busy "$1"; then echo "$1"; return; fi
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
for var in AIOSMTPD_PORT EDGE_PORT PF_PORT QUEUE_PORT; do
    want=${!var}
    printf -v "$var" '%s' "$(free_port "$want")"
    [ "${!var}" = "$want" ] || say "port $want is in use; $var=${!var} instead"
done
export PF_PORT PF_ROOT=${PF_ROOT:-/tmp/pfbench}  # read by postfix_instance.sh

# ---- results directory ---------------------------------------------------------
mkdir -p "$RESULTS_DIR"
if [ "${KEEP_RESULTS:-0}" != 1 ]; then
    rm -f "$RESULTS_TSV" "$RESULTS_DIR/summary.md" "$RESULTS_DIR/ratios.md"
fi
{
    echo "date: $(date -u +%FT%TZ)"
    echo "kernel: $(uname -srm)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)"
    if [ "$PIN" = 1 ]; then
        echo "pinning: server CPUs=$SERVER_CPUS client CPUs=$CLIENT_CPUS (taskset)"
    else
        echo "pinning: none"
    fi
    echo "slimta: $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)" \
        "($PYTHON: $("$PYTHON" --version 2>&1))"
    pythons=("$PYTHON")
    if [ -n "${AIOSMTPD_PYTHON:-}" ] && [ "$AIOSMTPD_PYTHON" != "$PYTHON" ]; then
        pythons+=("$AIOSMTPD_PYTHON")
    fi
    for py in "${pythons[@]}"; do
        "$py" - "$py" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
found = []
for p in ("aiosmtpd", "uvloop"):
    try:
        found.append(f"{p} {version(p)}")
    except PackageNotFoundError:
        found.append(f"{p} -")
print(f"{sys.argv[1]}: Python {sys.version.split()[0]}; " + ", ".join(found))
EOF
    done
    echo "postfix (smtp-source): $(postconf -d -h mail_version 2>/dev/null || echo '?')"
    echo "sqlite (for SmtpEdge+sqlite): $("$PYTHON" -c 'import sqlite3; print(sqlite3.sqlite_version)')"
    case " $SERVERS " in
        *" SmtpEdge+postgres"*)
            echo "postgres (for SmtpEdge+postgres): $(env "$EDGE_ENV" "$PYTHON" \
                "$HERE/queue_sink.py" --storage postgres --dsn "$PG_DSN" --info 2>&1)" ;;
    esac
    echo "scenarios: $SCENARIOS; runs: $RUNS"
} > "$RESULTS_DIR/env.txt"
cat "$RESULTS_DIR/env.txt" >&2

# ---- the rows ------------------------------------------------------------------
accept() { bash "$HARNESS" "$@"; }

# SmtpEdge rows send EDGE_SCALE_* times more messages per run
edge_accept() {
    N_S20_1K_KEEP=$((N_S20_1K_KEEP * EDGE_SCALE_1K)) \
    N_S20_1K_CONN=$((N_S20_1K_CONN * EDGE_SCALE_1K)) \
    N_S1_1K_KEEP=$((N_S1_1K_KEEP * EDGE_SCALE_1K)) \
    N_S20_100K_KEEP=$((N_S20_100K_KEEP * EDGE_SCALE_100K)) \
        accept "$@"
}

edge_cmd() {  # $1 = extra sink option
    if [ -n "${SMTPEDGE_CMD:-}" ]; then
        printf '%s --port %s %s' "$SMTPEDGE_CMD" "$EDGE_PORT" "$1"
    else
        printf 'exec env %q %q %q --port %s %s' "$EDGE_ENV" "$PYTHON" \
            "$HERE/slimta_sink.py" "$EDGE_PORT" "$1"
    fi
}

queue_cmd() {  # $1 = extra sink option
    printf 'exec env %q %q %q --port %s --db %q --pidfile %q %s' "$EDGE_ENV" "$PYTHON" \
        "$HERE/queue_sink.py" "$QUEUE_PORT" "$QUEUE_DB" "$QUEUE_DB.pid" "$1"
}

queue_reset_cmd() {  # $1 = log file (the harness discards the reset's output)
    printf 'env %q %q %q --reset --db %q --pidfile %q >> %q 2>&1' "$EDGE_ENV" "$PYTHON" \
        "$HERE/queue_sink.py" "$QUEUE_DB" "$QUEUE_DB.pid" "$1"
}

pg_sink_cmd() {  # $1 = extra sink option
    printf 'exec env %q %q %q --storage postgres --dsn %q --schema %q --port %s --pidfile %q %s' \
        "$EDGE_ENV" "$PYTHON" "$HERE/queue_sink.py" "$PG_DSN" "$PG_SCHEMA" "$QUEUE_PORT" \
        "$PG_PIDFILE" "$1"
}

pg_reset_cmd() {  # $1 = log file
    printf 'env %q %q %q --storage postgres --dsn %q --schema %q --reset --pidfile %q >> %q 2>&1' \
        "$EDGE_ENV" "$PYTHON" "$HERE/queue_sink.py" "$PG_DSN" "$PG_SCHEMA" "$PG_PIDFILE" "$1"
}

pg_drop() {
    env "$EDGE_ENV" "$PYTHON" "$HERE/queue_sink.py" --storage postgres --dsn "$PG_DSN" \
        --schema "$PG_SCHEMA" --drop >&2
}

remove_queue_db() { rm -f "$QUEUE_DB" "$QUEUE_DB-wal" "$QUEUE_DB-shm" "$QUEUE_DB-journal"; }

aiosmtpd_cmd() {  # $1 = extra sink option
    printf 'exec %q %q --port %s %s' "$AIOSMTPD_PYTHON" \
        "$SHARED_BENCH/servers/aiosmtpd_sink.py" "$AIOSMTPD_PORT" "$1"
}

failed=0
for s in $SERVERS; do
    [ "$s" = SmtpEdge ] && s=$EDGE_DEFAULT
    say "measuring $s"
    case $s in
        aiosmtpd|aiosmtpd+uvloop)
            if [ -z "${AIOSMTPD_PYTHON:-}" ]; then
                say "no Python with aiosmtpd: pip install -e '.[test]' or run $SHARED_BENCH/setup.sh"
                failed=1; continue
            fi
            opt=; [ "$s" = aiosmtpd+uvloop ] && opt=--uvloop
            accept -n "$s" "$(aiosmtpd_cmd "$opt")" "$AIOSMTPD_PORT" ;;
        SmtpEdge+uvloop)
            edge_accept -n "$s" "$(edge_cmd --uvloop)" "$EDGE_PORT" ;;
        SmtpEdge+asyncio)
            edge_accept -n "$s" "$(edge_cmd --no-uvloop)" "$EDGE_PORT" ;;
        postfix-hold)
            # as ../shared/bench/run_all.sh runs it; "start" (re)writes the
            # instance's configuration and empties its queue each time
            pfi=$(printf %q "$PFI")
            [ -f "$PF_ROOT/etc/main.cf" ] || PF_MODE=hold "$PFI" setup >&2 \
                || { say "postfix_instance.sh setup failed (root needed)"; failed=1; continue; }
            accept -n "$s" -k "$pfi stop" -r "$pfi reset" "PF_MODE=hold $pfi start" "$PF_PORT" ;;
        SmtpEdge+sqlite|SmtpEdge+sqlite+asyncio)
            opt=; [ "$s" = SmtpEdge+sqlite+asyncio ] && opt=--no-uvloop
            mkdir -p "$(dirname "$QUEUE_DB")"
            remove_queue_db
            reset_log=$RESULTS_DIR/$(printf '%s' "$s" | tr -c 'A-Za-z0-9._-' '_').reset.log
            rm -f "$reset_log"
            accept -n "$s" -r "$(queue_reset_cmd "$reset_log")" "$(queue_cmd "$opt")" "$QUEUE_PORT"
            rc=$?
            remove_queue_db
            (exit "$rc") ;;
        SmtpEdge+postgres|SmtpEdge+postgres+asyncio|SmtpEdge+postgres+pinned)
            opt=
            [ "$s" = SmtpEdge+postgres+asyncio ] && opt=--no-uvloop
            [ "$s" = SmtpEdge+postgres+pinned ] && opt=--pin-backends
            PG_PIDFILE=$RESULTS_DIR/queue/postgres-sink.pid
            mkdir -p "$(dirname "$PG_PIDFILE")"
            pg_drop || { say "cannot reach PostgreSQL at $PG_DSN"; failed=1; continue; }
            reset_log=$RESULTS_DIR/$(printf '%s' "$s" | tr -c 'A-Za-z0-9._-' '_').reset.log
            rm -f "$reset_log"
            accept -n "$s" -r "$(pg_reset_cmd "$reset_log")" "$(pg_sink_cmd "$opt")" "$QUEUE_PORT"
            rc=$?
            pg_drop
            (exit "$rc") ;;
        *)
            say "unknown server $s"; failed=1; continue ;;
    esac
    rc=$?
    if [ "$rc" != 0 ]; then
        say "$s failed (harness exit $rc); logs in $RESULTS_DIR/"
        failed=1
    fi
done

# ---- tables ----------------------------------------------------------------------
[ -s "$RESULTS_TSV" ] || die "no results in $RESULTS_TSV"
python3 "$SUMMARIZE" "$RESULTS_TSV" > "$RESULTS_DIR/summary.md"
check=; [ "${CHECK_TARGETS:-0}" = 1 ] && check=--check
python3 "$HERE/ratios.py" "$RESULTS_TSV" $check > "$RESULTS_DIR/ratios.md"
ratios_rc=$?
echo
cat "$RESULTS_DIR/env.txt"
echo
cat "$RESULTS_DIR/summary.md"
echo
cat "$RESULTS_DIR/ratios.md"
echo
say "results in $RESULTS_DIR (results.tsv, summary.md, ratios.md, env.txt, logs)"
[ "$failed" = 0 ] || exit 1
exit "$ratios_rc"
