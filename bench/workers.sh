#!/usr/bin/env bash
# bench/workers.sh - SMTP accept rate of `slimta serve --workers 2` against
# `slimta serve --workers 1`, in one run, on loopback, with Postfix's
# smtp-source as the client (20 sessions kept alive, 1 KB messages).
#
#   bash bench/workers.sh                      # about 2 minutes
#   WORKERS="1 2 1 2" bash bench/workers.sh    # each row twice, interleaved
#   RUNS=5 N_S20_1K_KEEP=40000 bash bench/workers.sh
#
# Each row is the real daemon, `slimta serve -c CONFIG --workers N`, run from
# this checkout's src/, with a default-like config: one SMTP edge (every
# limit at its default, log_level INFO) storing into a durable SQLite queue
# (synchronous=FULL) that has no relay, so the daemon only accepts and stores
# (what an edge-only process does; nothing is delivered, so the accept path
# is all that is measured). With N workers, worker i stores into q.i.db.
#
# Each row is measured by the shared harness ../shared/bench/smtp_accept.sh
# (seen from the repository root): one swaks check, a warm-up of 1,000
# messages, then $RUNS timed runs of smtp-source. Before the warm-up and each
# timed run (untimed) every stored message is deleted from the queue files
# and their WAL truncated, from another connection while the daemon runs
# (the queue has no relay, so it keeps nothing of them in memory), so every
# run starts from empty queues. Then this prints the harness's table and the
# ratio of the medians (msgs/s of --workers 2 over --workers 1).
#
# Environment (defaults in brackets):
#   WORKERS ["1 2"]   the rows, by worker count, in this order
#   SCENARIOS [s20_1k_keep]   RUNS [3]   N_S20_1K_KEEP [20000] msgs per run
#   PIN [0]: unpinned, so the workers and smtp-source share both CPUs as the
#            scheduler likes (PIN=1 pins the daemon to SERVER_CPUS [1] and
#            smtp-source to CLIENT_CPUS [0], which defeats the point)
#   RESULTS_DIR [/tmp/slimta-bench-workers]   PYTHON [python3]
#   PORT [2512]: when it is in use, a free port is picked instead
#   SHARED_BENCH [../shared/bench, or beside the main checkout of a git
#            worktree]   TARGET [1.3]: CHECK_TARGETS=1 makes the
#            exit status 1 when the ratio of the last two rows is below it
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
[ -d "$SHARED_BENCH" ] && SHARED_BENCH=$(cd "$SHARED_BENCH" && pwd)
HARNESS=$SHARED_BENCH/smtp_accept.sh
SUMMARIZE=$SHARED_BENCH/summarize.py

WORKERS=${WORKERS:-"1 2"}
export SCENARIOS=${SCENARIOS:-s20_1k_keep}
export RUNS=${RUNS:-3}
export N_S20_1K_KEEP=${N_S20_1K_KEEP:-20000}
export PIN=${PIN:-0}
export RESULTS_DIR=${RESULTS_DIR:-/tmp/slimta-bench-workers}
export RESULTS_TSV=$RESULTS_DIR/results.tsv
PYTHON=${PYTHON:-python3}
PORT=${PORT:-2512}
TARGET=${TARGET:-1.3}

say() { printf '== bench: %s\n' "$*" >&2; }
die() { printf '== bench: ERROR: %s\n' "$*" >&2; exit 2; }

[ -f "$HARNESS" ] || die "shared harness not found: $HARNESS (set SHARED_BENCH)"
case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH=$PATH:/usr/sbin ;; esac
command -v smtp-source > /dev/null || die "smtp-source missing (apt-get install postfix)"
command -v swaks > /dev/null || die "swaks missing (apt-get install swaks)"
command -v "$PYTHON" > /dev/null || die "no $PYTHON"

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if port_busy "$PORT"; then
    want=$PORT
    PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    say "port $want is in use; PORT=$PORT instead"
fi

mkdir -p "$RESULTS_DIR"
rm -f "$RESULTS_TSV"
{
    echo "date: $(date -u +%FT%TZ)"
    echo "kernel: $(uname -srm)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)"
    echo "pinning: $([ "$PIN" = 1 ] && echo "server ${SERVER_CPUS:-1}, client ${CLIENT_CPUS:-0}" || echo none)"
    echo "slimta: $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)" \
        "($PYTHON: $("$PYTHON" --version 2>&1), SQLite $("$PYTHON" -c 'import sqlite3; print(sqlite3.sqlite_version)'))"
    echo "rows: --workers $WORKERS; scenarios: $SCENARIOS; runs: $RUNS; msgs per run: $N_S20_1K_KEEP"
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

failed=0
row=0
for n in $WORKERS; do
    row=$((row + 1))
    dir=$RESULTS_DIR/row$row-w$n
    rm -rf "$dir"
    mkdir -p "$dir"
    cat > "$dir/slimta.yaml" <<EOF
process:
  slimta: {data_dir: data}
edge:
  in: {type: smtp, queue: q, listener: '127.0.0.1:$PORT'}
queue:
  q: {type: sqlite}   # no relay: it only stores
EOF
    start=$(printf 'cd %q && exec env PYTHONPATH=%q %q -c %q serve -c slimta.yaml --workers %s' \
        "$dir" "$ROOT/src" "$PYTHON" "from slimta.app.cli import main; main()" "$n")
    reset=$(printf '%q -c %q %q' "$PYTHON" "$RESET_PY" "$dir/data")
    say "measuring slimta serve --workers $n"
    bash "$HARNESS" -n "workers=$n" -r "$reset" "$start" "$PORT" || {
        say "--workers $n failed; logs in $RESULTS_DIR/"; failed=1; }
done

[ -s "$RESULTS_TSV" ] || die "no results in $RESULTS_TSV"
[ -f "$SUMMARIZE" ] && python3 "$SUMMARIZE" "$RESULTS_TSV" > "$RESULTS_DIR/summary.md"
python3 - "$RESULTS_TSV" "$TARGET" > "$RESULTS_DIR/ratio.md" <<'EOF'
import csv, statistics, sys
rates = {}
for r in csv.DictReader(open(sys.argv[1]), delimiter="\t"):
    if r["scenario"] == "swaks_check" or r["rc"] != "0" or r["msgs_per_s"] == "NA":
        continue
    rates.setdefault((r["scenario"], r["server"]), []).append(float(r["msgs_per_s"]))
print("| scenario | row | runs (msgs/s) | median |")
print("|---|---|---|---|")
medians = {}
for (sc, server), values in rates.items():
    medians.setdefault(sc, {}).setdefault(server, []).append(statistics.median(values))
    print(f"| {sc} | {server} | {', '.join(f'{v:,.0f}' for v in values)} | "
          f"{statistics.median(values):,.0f} |")
ok = True
for sc, by in medians.items():
    one = statistics.median(by.get("workers=1", [0])) if "workers=1" in by else None
    for server, ms in sorted(by.items()):
        if server == "workers=1" or one is None or not one:
            continue
        ratio = statistics.median(ms) / one
        met = ratio >= float(sys.argv[2])
        ok = ok and (server != "workers=2" or met)
        print(f"\n{sc}: {server} / workers=1 = **{ratio:.2f}x** "
              f"(target >= {sys.argv[2]}x for workers=2: {'met' if met else 'MISSED'})")
sys.exit(0 if ok else 3)
EOF
ratio_rc=$?
echo
cat "$RESULTS_DIR/env.txt"
echo
[ -f "$RESULTS_DIR/summary.md" ] && cat "$RESULTS_DIR/summary.md" && echo
cat "$RESULTS_DIR/ratio.md"
say "results in $RESULTS_DIR"
[ "$failed" = 0 ] || exit 1
if [ "${CHECK_TARGETS:-0}" = 1 ] && [ "$ratio_rc" != 0 ]; then exit 1; fi
exit 0
