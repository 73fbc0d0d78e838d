#!/usr/bin/env bash
# bench/workers.sh - SMTP accept rate of `slimta serve --workers 2` against
# `slimta serve --workers 1`, in one run, on loopback, with Postfix's
# smtp-source as the client (20 sessions kept alive, 1 KB messages).
#
#   bash bench/workers.sh                      # about 3 minutes
#   RUNS=5 bash bench/workers.sh
#   WORKERS="1 2 3" bash bench/workers.sh
#
# Each row is the real daemon, `slimta serve -c CONFIG --workers N`, run from
# this checkout's src/, with a default-like config: one SMTP edge (every
# limit at its default, log_level INFO, logging to a file) storing into a
# durable SQLite queue (synchronous=FULL) that has no relay, so the daemon
# only accepts and stores, as an edge-only process does: nothing is
# delivered, and the accept path is all that is measured. With N workers,
# worker i stores into q.i.db.
#
# All rows run side by side (each on its own port; an idle daemon costs
# nothing) and the timed runs alternate between them: run 1 of each row,
# then run 2 of each row, ... So on a machine where other jobs come and go,
# neighbouring runs of the rows see about the same background load, and the
# ratio of the medians is not decided by which row ran when a neighbour was
# busy. Nothing is pinned: the workers, smtp-source and the kernel share
# both CPUs as the scheduler likes.
#
# Per row, first: a check that one message is accepted (smtplib; must get a
# 250) and an untimed warm-up of 1,000 messages. Before every timed run
# (untimed) every stored message is deleted from the row's queue files and
# their WAL truncated, from another connection while the daemon runs (the
# queue has no relay, so it keeps nothing of them in memory): each run
# starts from empty queues. A run counts only when smtp-source exits 0.
# Results go to $RESULTS_DIR/results.tsv in the format of the shared
# harness (../shared/bench/smtp_accept.sh), so its summarize.py prints the
# tables; this script then prints the ratio of the medians to --workers 1,
# and the median of the ratios of the paired runs.
#
# Environment (defaults in brackets):
#   WORKERS ["1 2"]   the rows, by worker count
#   RUNS [3]   MSGS [20000] per timed run   WARMUP_MSGS [1000]
#   SESSIONS [20]   SIZE [1024]   RUN_TIMEOUT [300] seconds per run
#   RESULTS_DIR [/tmp/slimta-bench-workers]   PYTHON [python3]
#   BASE_PORT [2512]: row k listens on BASE_PORT + k - 1 (a port in use is
#             replaced by a free one)
#   SHARED_BENCH [../shared/bench, or beside the main checkout of a git
#             worktree] (only for summarize.py)
#   TARGET [1.3]   CHECK_TARGETS [0]: 1 makes the exit status 1 when
#             --workers 2 is below TARGET times --workers 1
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
if [ -z "${SHARED_BENCH:-}" ]; then
    SHARED_BENCH=$ROOT/../shared/bench
    if [ ! -d "$SHARED_BENCH" ]; then  # a git worktree: beside the main checkout
        common=$(git -C "$ROOT" rev-parse --path-format=absolute --git-common-dir 2>/dev/null)
        [ -n "$common" ] && SHARED_BENCH=$(dirname "$common")/../shared/bench
    fi
fi
SUMMARIZE=$SHARED_BENCH/summarize.py

WORKERS=${WORKERS:-"1 2"}
RUNS=${RUNS:-3}
MSGS=${MSGS:-20000}
WARMUP_MSGS=${WARMUP_MSGS:-1000}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-1024}
RUN_TIMEOUT=${RUN_TIMEOUT:-300}
RESULTS_DIR=${RESULTS_DIR:-/tmp/slimta-bench-workers}
RESULTS_TSV=$RESULTS_DIR/results.tsv
PYTHON=${PYTHON:-python3}
BASE_PORT=${BASE_PORT:-2512}
TARGET=${TARGET:-1.3}
SCENARIO=s${SESSIONS}_$((SIZE / 1024))k_keep

say() { printf '== bench: %s\n' "$*" >&2; }
die() { printf '== bench: ERROR: %s\n' "$*" >&2; exit 2; }

case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH=$PATH:/usr/sbin ;; esac
SMTP_SOURCE=${SMTP_SOURCE:-$(command -v smtp-source || echo /usr/sbin/smtp-source)}
[ -x "$SMTP_SOURCE" ] || die "smtp-source missing (apt-get install postfix)"
command -v "$PYTHON" > /dev/null || die "no $PYTHON"

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
    if ! port_busy "$1"; then echo "$1"; return; fi
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

mkdir -p "$RESULTS_DIR"
printf 'time\tserver\tscenario\trun\tmsgs\tsize\tsessions\tkeepalive\tseconds\tmsgs_per_s\trc\tcpu0_busy_pct\tcpu1_busy_pct\n' \
    > "$RESULTS_TSV"
{
    echo "date: $(date -u +%FT%TZ)"
    echo "kernel: $(uname -srm)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)"
    echo "pinning: none; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "slimta: $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)" \
        "($PYTHON: $("$PYTHON" --version 2>&1), SQLite $("$PYTHON" -c 'import sqlite3; print(sqlite3.sqlite_version)'))"
    echo "rows: --workers $WORKERS; $RUNS runs of $MSGS msgs ($SIZE bytes, $SESSIONS sessions kept alive), alternating"
} > "$RESULTS_DIR/env.txt"
cat "$RESULTS_DIR/env.txt" >&2

# deletes every stored message of the queue files in $1 and truncates their WAL
RESET_PY='
import glob, sqlite3, sys
for path in glob.glob(sys.argv[1] + "/q*.db"):
    db = sqlite3.connect(path, timeout=30)
    db.execute("DELETE FROM messages")
    db.commit()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
'
CHECK_PY='
import smtplib, sys, time
for _ in range(300):
    try:
        with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30) as c:
            c.sendmail("bench-from@example.com", ["bench-to@example.com"], b"Subject: check\r\n\r\nhi\r\n")
            sys.exit(0)
    except (ConnectionRefusedError, smtplib.SMTPServerDisconnected):
        time.sleep(0.1)
sys.exit(1)
'

declare -A PID PORT DIR
cleanup() {
    for n in "${!PID[@]}"; do
        kill -TERM "${PID[$n]}" 2>/dev/null
    done
    for n in "${!PID[@]}"; do
        wait "${PID[$n]}" 2>/dev/null
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port=$BASE_PORT
for n in $WORKERS; do
    PORT[$n]=$(free_port "$port")
    port=$((port + 1))
    DIR[$n]=$RESULTS_DIR/w$n
    rm -rf "${DIR[$n]}"
    mkdir -p "${DIR[$n]}"
    cat > "${DIR[$n]}/slimta.yaml" <<EOF
process:
  slimta: {data_dir: data}
edge:
  in: {type: smtp, queue: q, listener: '127.0.0.1:${PORT[$n]}'}
queue:
  q: {type: sqlite}   # no relay: it only stores
EOF
    (cd "${DIR[$n]}" && exec env PYTHONPATH="$ROOT/src" "$PYTHON" \
        -c "from slimta.app.cli import main; main()" serve -c slimta.yaml --workers "$n" \
        > "$RESULTS_DIR/workers_$n.server.log" 2>&1 < /dev/null) &
    PID[$n]=$!
    say "started slimta serve --workers $n on 127.0.0.1:${PORT[$n]} (pid ${PID[$n]})"
done

cpu_snap() {  # "busy total" jiffies of cpu $1
    awk -v c="cpu$1" '$1 == c { t = 0; for (i = 2; i <= NF; i++) t += $i;
        print t - $5 - $6, t }' /proc/stat
}
busy_pct() {
    awk -v a="$1" -v b="$2" 'BEGIN { split(a, x); split(b, y);
        dt = y[2] - x[2]; if (dt <= 0) { print "NA"; exit }
        printf "%.0f", 100 * (y[1] - x[1]) / dt }'
}

source_run() {  # $1 = port, $2 = msgs, $3 = log; sets RC, SECS
    local t0 t1
    t0=$EPOCHREALTIME
    timeout "$RUN_TIMEOUT" "$SMTP_SOURCE" -M bench.example -f bench-from@example.com \
        -t bench-to@example.com -s "$SESSIONS" -l "$SIZE" -m "$2" -d "127.0.0.1:$1" >> "$3" 2>&1
    RC=$?
    t1=$EPOCHREALTIME
    SECS=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
}

failed=0
for n in $WORKERS; do
    if "$PYTHON" -c "$CHECK_PY" "${PORT[$n]}"; then ok=0; else ok=1; failed=1; fi
    printf '%s\tworkers=%s\tswaks_check\t1\t1\t-\t1\t0\t-\t-\t%s\t-\t-\n' \
        "$(date -u +%FT%TZ)" "$n" "$ok" >> "$RESULTS_TSV"
    [ "$ok" = 0 ] || { say "--workers $n did not accept a message; see $RESULTS_DIR"; continue; }
    "$PYTHON" -c "$RESET_PY" "${DIR[$n]}/data"
    source_run "${PORT[$n]}" "$WARMUP_MSGS" "$RESULTS_DIR/workers_$n.warmup.log"
    say "--workers $n: warm-up $WARMUP_MSGS msgs in ${SECS}s rc=$RC"
done
[ "$failed" = 0 ] || exit 1

for run in $(seq 1 "$RUNS"); do
    for n in $WORKERS; do
        "$PYTHON" -c "$RESET_PY" "${DIR[$n]}/data"
        a0=$(cpu_snap 0) b0=$(cpu_snap 1)
        source_run "${PORT[$n]}" "$MSGS" "$RESULTS_DIR/workers_$n.$SCENARIO.log"
        a1=$(cpu_snap 0) b1=$(cpu_snap 1)
        rate=NA
        [ "$RC" = 0 ] && rate=$(awk -v m="$MSGS" -v s="$SECS" 'BEGIN { printf "%.1f", m / s }')
        printf '%s\tworkers=%s\t%s\t%s\t%s\t%s\t%s\t1\t%s\t%s\t%s\t%s\t%s\n' \
            "$(date -u +%FT%TZ)" "$n" "$SCENARIO" "$run" "$MSGS" "$SIZE" "$SESSIONS" \
            "$SECS" "$rate" "$RC" "$(busy_pct "$a0" "$a1")" "$(busy_pct "$b0" "$b1")" \
            >> "$RESULTS_TSV"
        say "run $run, --workers $n: $MSGS msgs in ${SECS}s = $rate msgs/s (rc=$RC)"
    done
done
cleanup
trap - EXIT

for n in $WORKERS; do  # how the connections were spread over the workers
    log=$RESULTS_DIR/workers_$n.server.log
    [ "$n" -gt 1 ] || continue
    spread=$(for i in $(seq 1 "$n"); do
        printf 'worker %s: %s  ' "$i" "$(grep -c "\[worker $i\] slimta.edge.smtp queued" "$log")"
    done)
    echo "--workers $n, messages per worker: $spread" >> "$RESULTS_DIR/env.txt"
done

[ -f "$SUMMARIZE" ] && python3 "$SUMMARIZE" "$RESULTS_TSV" > "$RESULTS_DIR/summary.md"
python3 - "$RESULTS_TSV" "$TARGET" > "$RESULTS_DIR/ratio.md" <<'EOF'
import csv, statistics, sys
runs = {}
for r in csv.DictReader(open(sys.argv[1]), delimiter="\t"):
    if r["scenario"] == "swaks_check":
        continue
    rate = float(r["msgs_per_s"]) if r["rc"] == "0" and r["msgs_per_s"] != "NA" else None
    runs.setdefault(r["server"], {})[int(r["run"])] = rate
base = runs.get("workers=1", {})
print("| row | msgs/s per run | median | ratio of medians to workers=1 "
      "| median of paired ratios |")
print("|---|---|---|---|---|")
ok = True
for server, by_run in runs.items():
    good = [v for v in by_run.values() if v is not None]
    med = statistics.median(good) if good else float("nan")
    cells = ", ".join("failed" if v is None else f"{v:,.0f}" for _, v in sorted(by_run.items()))
    ratio = paired = ""
    if server != "workers=1" and base:
        good1 = [v for v in base.values() if v is not None]
        r = med / statistics.median(good1) if good1 else float("nan")
        pairs = [v / base[k] for k, v in by_run.items() if v and base.get(k)]
        ratio = f"**{r:.2f}x**"
        paired = f"{statistics.median(pairs):.2f}x" if pairs else "-"
        if server == "workers=2":
            ok = r >= float(sys.argv[2])
            ratio += f" (target >= {sys.argv[2]}x: {'met' if ok else 'MISSED'})"
    print(f"| {server} | {cells} | {med:,.0f} | {ratio} | {paired} |")
sys.exit(0 if ok else 3)
EOF
ratio_rc=$?
echo
cat "$RESULTS_DIR/env.txt"
echo
[ -f "$RESULTS_DIR/summary.md" ] && cat "$RESULTS_DIR/summary.md" && echo
cat "$RESULTS_DIR/ratio.md"
say "results in $RESULTS_DIR"
if [ "${CHECK_TARGETS:-0}" = 1 ] && [ "$ratio_rc" != 0 ]; then exit 1; fi
exit 0
