#!/usr/bin/env bash
# The scale run on a lent many-core machine (never CI): build the core there from the
# carried generated C (ext/_core.c) against carried liblz4/libxxhash headers (.devdeps,
# Debian 12's packages unpacked), then: the pipeline from 1 to 8 threads, an 8 GiB
# migration with tracking on and off (issue 8's goal), a 16 GiB migration (issue 6).
# Results land in $OUT (JSON + log). Carry: .local/criu .devdeps ext/_core.c
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/scale-out}; mkdir -p "$OUT"
PY=$(command -v python3)
D=$PWD/.devdeps/usr
LIB=$D/lib/x86_64-linux-gnu
SUFFIX=$($PY -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
INC=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
{ uname -r; nproc; free -g | head -2; ulimit -Hn; $PY -V; } 2>&1
time gcc -O3 -std=gnu11 -shared -fPIC -fno-strict-aliasing -I"$INC" -Iext -Iext/c -I"$D/include" \
    ext/_core.c ext/c/*.c -L"$LIB" -Wl,-rpath,"$LIB" -llz4 -lxxhash \
    -o "src/deltaxfer/_core$SUFFIX" || exit 1
export PYTHONPATH=$PWD/src DELTAXFER_CRIU=$PWD/.local/criu/bin/criu
$PY -c "from deltaxfer import _core, tracking; print(_core.lib_versions(), 'tracking:', tracking.support())"
$DELTAXFER_CRIU --version; $DELTAXFER_CRIU check 2>&1 | tail -3
[ "${SKIP_PIPE:-0}" = 1 ] || timeout ${PIPE_T:-150} $PY bench/scale_pipeline.py --mib ${PIPE_MIB:-2048} --threads 1,2,4,8,16 \
    --json "$OUT/pipeline.json" > "$OUT/pipeline.log" 2>&1; echo "pipeline rc=$?"
grep -E '"(GBps|x_1_thread|memcpy_GBps)"' "$OUT/pipeline.log" | tr -s ' ' | paste -sd ' '
ulimit -n 1048576 2>/dev/null || ulimit -n 262144 2>/dev/null || ulimit -n 65536
echo "nofile now $(ulimit -n)"
timeout ${M8_T:-200} $PY bench/scale_migrate.py --mib ${M8_MIB:-8192} --modes ${M8_MODES:-on,off} --json "$OUT/m8g.json" \
    > "$OUT/m8g.log" 2>&1; echo "8G rc=$?"; cut -c1-600 "$OUT/m8g.log" | tail -4
if [ "$(ulimit -n)" -lt 40000 ]; then
    echo "16G skipped: a lazy dump keeps ~2048 fds per GiB and open files are capped at $(ulimit -n)"
    exit 0
fi
timeout ${M16_T:-220} $PY bench/scale_migrate.py --mib ${M16_MIB:-16384} --modes on --json "$OUT/m16g.json" \
    > "$OUT/m16g.log" 2>&1; echo "16G rc=$?"; cut -c1-600 "$OUT/m16g.log" | tail -3
