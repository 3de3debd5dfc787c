#!/usr/bin/env bash
# The scale run on a lent many-core machine (never CI; bare, no package registry): build
# the core there from the carried generated C (ext/_core.c) against carried
# liblz4/libxxhash headers (.devdeps, Debian 12's packages unpacked), python-lz4 from a
# carried wheel (.whl), then:
#   1. the page pipeline on 1..16 threads (bench/scale_pipeline.py);
#   2. the migration benchmark's own harness (bench/bench_migrate.py) on the host's
#      loopback (link `host-lo`: the machine has no iproute2), a memwork of $MIB MiB
#      dirtying 10 MiB/s moved by deltaxfer (all cores) and by CRIU's page-server in the
#      same run; the JSON row of each carries total time, downtime, CPU per side, peak
#      RSS and the first round's GB/s of process memory;
#   3. if $EXTRA_T > 0 and it fits in $BUDGET_S: $EXTRA_METHODS again with $EXTRA_ENV set
#      (default: deltaxfer with 4 encoder threads). Before 2: bench/scale_write.py and
#      bench/scale_apply.py (SKIP_WRITE=1, SKIP_APPLY=1 leave them out).
# Results land in $OUT (JSON + logs).
# Carry: .local/criu .devdeps ext/_core.c .whl tests/workloads/bin src/deltaxfer/_hook_agent
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/scale-out}; mkdir -p "$OUT"
T0=$(date +%s)
PY=$(command -v python3)
D=$PWD/.devdeps/usr
LIB=$D/lib/x86_64-linux-gnu
SUFFIX=$($PY -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
INC=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
{ uname -r; nproc; free -g | head -2; ulimit -Hn; $PY -V; df -h /tmp | tail -1; } 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
time gcc -O3 -std=gnu11 -shared -fPIC -fno-strict-aliasing -I"$INC" -Iext -Iext/c -I"$D/include" \
    ext/_core.c ext/c/*.c -L"$LIB" -Wl,-rpath,"$LIB" -llz4 -lxxhash \
    -o "src/deltaxfer/_core$SUFFIX" || exit 1
[ -x src/deltaxfer/_hook_agent ] || gcc -O2 -std=gnu11 ext/hook/hook_agent.c \
    -o src/deltaxfer/_hook_agent || exit 1
export PYTHONPATH=$PWD/src:/tmp/site
$PY -c "from deltaxfer import _core, tracking; print(_core.lib_versions(), 'tracking:', tracking.support())"
.local/criu/bin/criu --version | head -1; .local/criu/bin/criu check 2>&1 | tail -2
ulimit -n 1048576 2>/dev/null || ulimit -n 262144 2>/dev/null || ulimit -n 65536
echo "nofile now $(ulimit -n); setup $(( $(date +%s) - T0 )) s"

[ "${SKIP_PIPE:-0}" = 1 ] || { timeout ${PIPE_T:-90} $PY bench/scale_pipeline.py --mib ${PIPE_MIB:-2048} \
    --threads 1,2,4,8,16 --json "$OUT/pipeline.json" > "$OUT/pipeline.log" 2>&1
    echo "pipeline rc=$? at $(( $(date +%s) - T0 )) s"; tail -c 600 "$OUT/pipeline.log"; echo; }

[ "${SKIP_WRITE:-0}" = 1 ] || { timeout ${WRITE_T:-60} $PY bench/scale_write.py --mib ${WRITE_MIB:-4096} \
    --threads 8 --json "$OUT/write.json" > "$OUT/write.log" 2>&1
    echo "write rc=$? at $(( $(date +%s) - T0 )) s"; cat "$OUT/write.log"; }

# the destination's apply alone: memwork's frames applied to one preallocated pages file
# by 1..16 C threads (the write lock covers only a frame's pwritev calls since the ninth
# session), a 1-thread pwritev of the same bytes beside
[ "${SKIP_APPLY:-0}" = 1 ] || { timeout ${APPLY_T:-90} $PY bench/scale_apply.py --mib ${APPLY_MIB:-2048} \
    --threads 1,2,4,8,16 --json "$OUT/apply.json" > "$OUT/apply.log" 2>&1
    echo "apply rc=$? at $(( $(date +%s) - T0 )) s"; tail -c 900 "$OUT/apply.log"; echo; }

matrix() {   # $1 tag, $2 cells, $3 timeout; the rest: env
    local tag=$1 cells=$2 t=$3; shift 3
    env "$@" DX_BENCH_LOGS=/tmp/dx-logs-$tag DX_MATRIX="$cells" DX_MATRIX_REPS=1 \
        timeout "$t" $PY -m pytest -p no:cacheprovider \
        bench/bench_migrate.py --benchmark-only -s -q > "$OUT/$tag.log" 2>&1
    echo "$tag rc=$? at $(( $(date +%s) - T0 )) s"
    cp .benchmarks/migrate-matrix-cells.json "$OUT/$tag.json" 2>/dev/null
    $PY - "$OUT/$tag.json" <<'EOF'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(f"no JSON: {e}")
for r in d.get("runs", []):
    keys = ("method", "total_s", "downtime_s", "app_pause_s", "cpu_src_s", "cpu_dst_s",
            "peak_rss_mib", "first_round", "rounds", "error")
    print({k: r.get(k) for k in keys if k in r})
EOF
    grep -E "Error|FAILED|failed" "$OUT/$tag.log" | head -5
    # the receiver's own account of each round (its waits for the applies)
    grep -hE "round [0-9]+ complete|committed" /tmp/dx-logs-$tag/*.log 2>/dev/null \
        | cut -c1-400 > "$OUT/$tag-serve.txt"; head -3 "$OUT/$tag-serve.txt"
}
MIB=${MIB:-16384}
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null
matrix "m$((MIB/1024))g" "mem$((MIB/1024))G-d10@host-lo:${METHODS:-deltaxfer+page-server}" ${M_T:-330}
if [ "${EXTRA_T:-0}" -gt 0 ] && [ $(( $(date +%s) - T0 + EXTRA_T )) -le ${BUDGET_S:-540} ]; then
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null
    matrix "m$((MIB/1024))g-extra" "mem$((MIB/1024))G-d10@host-lo:${EXTRA_METHODS:-deltaxfer}" \
        "$EXTRA_T" ${EXTRA_ENV:-DELTAXFER_ENCODER_THREADS=4}
fi
echo "done at $(( $(date +%s) - T0 )) s"
