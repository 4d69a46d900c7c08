#!/usr/bin/env bash
# The GPU suite, one script for a machine with a GPU (H100/H200; Python 3.12, torch 2.11, triton 3.6; no DeepSpeed,
# no DALI, open_clip optional), run from anywhere:
#
#     COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_suite.sh
#
# 1. kernel and model tests, natively (no interpreter): tests/test_{graph,engine,patch_embed,varlen_attention,
#    short_attention,layer_norm,gelu,adamw,finish_sums,linear,mlp,model,loss,flops,presets,interop}.py (none imports
#    DeepSpeed or DALI; presets/interop skip without open_clip)
# 2. kernel microbenchmarks: pytest --benchmark-only on each bench/test_bench_*.py (one JSON each)
# 3. the throughput grids: --grid clipa into clipa/; the two goal points with the opt-in kernels (kernels/: clipfast,
#    open_clip, CUDA graphs with and without the kernels, the eager kernels); a step profile (clipfast with and
#    without the kernels, open_clip); compiled blocks (compile/), a launch-config sweep of the kernels (sweep/) and
#    --grid gpu only if T_COMPILE, T_SWEEP, T_GRID are set
# Everything lands in bench/results/<device>-<date>/ (suite.log, per-part logs, summary.md with device, date,
# commit); with $OUT set (the device tool), summary.md, throughput.{md,png} and a tarball of the folder are
# copied there. Each part runs under `timeout`; a failing or timed-out part is logged and the next one runs.
# The suite ends within SUITE_BUDGET=585 s (the device tool allows 600 per command): each part's timeout is cut to
# what is left, and parts with under 20 s left are skipped, so summary.md and the tarball are always written. Parts
# (typical ones end sooner than their timeouts; 0 skips a part):
#   T_ENV=60 the environment report (nvidia-smi, versions; ~20 s)
#   T_TESTS=150 (pytest -n 8 where xdist is installed; 120 s cut the H200 run at efae470 short, cold, where a warm
#     rerun took 107 s; 150 s cut the H100 runs at 5cc21e3 at ~88% and at 62cbe1a at ~71%, no failure by then; the
#     files in two calls at c9d6f1c took 79 s and over 105 s); SUITE_TESTS replaces the
#     test files (default: the list below)
#   T_BENCH=180 (split over the microbenchmark files, 30 s each; under the number of files: skipped); SUITE_BENCH
#     replaces the files (default bench/test_bench_*.py)
#   T_CLIPA=100 (the CLIPA goal points, --grid clipa, into clipa/; 111 s at 5cc21e3); CLIPA_ARGS replaces the grid's
#     arguments (default "--grid clipa")
#   T_KERNELS=100 (the two goal points with --kernels, into kernels/); KERNELS_ARGS adds arguments
#   T_PROFILE=40 (bench/profile_step.py: B/16 112 px / 16 tokens, batch 1024; PROFILE_IMPLS the steps, default
#     "clipfast clipfast_kernels open_clip"; "clipfast_graph_kernels" profiles the goal column's graphed step)
#   T_PROFILE_L=0 (>0: the same at L/16 96 px / 8 tokens, batch 512, into profile_l16/; PROFILE_L_IMPLS the steps,
#     default "clipfast_kernels clipfast_graph_kernels open_clip")
#   T_COMPILE=0 (>30: the two goal points, eager beside compiled blocks, into compile/; compiled was slower, 105.0
#     vs 93.5 ms, at 5cc21e3)
#   T_SWEEP=0 (>0: bench/sweep_kernels.py into sweep/, ~50 s); SWEEP_ARGS adds arguments (e.g. "--kernels mlp")
#   T_AB=0 (>30: per variant of AB_KNOBS, the kernels part's two points again, graphs+kernels only, with kernel
#     switches (throughput.py --knob; variants split by ";", an empty one the defaults; default " ;
#     graph.OVERLAP_OPTIMIZER=0 ; adamw.SLOTS=1 _common.FINISH=torch"), into kernels_ab1/, kernels_ab2/, ...)
#   T_GRID=0 (--grid gpu: 3 points fit in 40 s, and clipa/ carries the comparison); GRID_ARGS replaces the grid's
#     arguments (default "--grid gpu")
#   T_DATA=0 (>0: bench/data_path.py --no-loader on the GPU host's CPU into data_path/: the shard reader's and the
#     tokeniser's cost per sample beside the H100 steps' need, and what 1, 2 and 4 reader processes deliver; 31 s
#     on the 2-core CPU machine with the shards made; no DALI needed)
#   T_ACCUM=0 (>0: bench/accum.py --graph at B/16 112 px / 16 tokens, batch 1024, 1 and 4 micro-batches, eager and as
#     one CUDA graph each, into accum/: the graphed accumulation's time and its graph pool's size)
# plus a few seconds for the wheels. PYTHON (default python3) is the interpreter.
#
# open_clip (and ftfy, wcwidth; regex, timm, huggingface-hub, safetensors, tqdm, torchvision are already in the
# GPU image) travel as wheels in .whl/ (git-ignored; 2.4 MB). Prepare them on a machine with PyPI access with
#     bash bench/fetch_wheels.sh              # --deepspeed adds DeepSpeed 0.19.8 + pydantic & co (7.1 MB in all)
# and carry .whl with the tree (device tool: carry=[".whl"]). This script installs them with
#     pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# Without them the open_clip column is skipped with a note (and tests that need open_clip skip or fail, logged).
# The suite itself needs no DeepSpeed (nothing it runs imports it); the wheels are for running clipfast.train there.
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PY=${PYTHON:-python3}
T_TESTS=${T_TESTS:-150}
T_BENCH=${T_BENCH:-180}
T_CLIPA=${T_CLIPA:-100}  # 0: no CLIPA goal grid
T_COMPILE=${T_COMPILE:-0}  # >30: compiled blocks at the two CLIPA goal points (slower than eager at 5cc21e3)
T_KERNELS=${T_KERNELS:-100}  # 0: no run with clipfast's opt-in kernels at the two goal points
T_SWEEP=${T_SWEEP:-0}  # >0: bench/sweep_kernels.py, the kernels' launch configs (about 50 s on an H100)
T_AB=${T_AB:-0}  # >30: the kernels part's two points again per AB_KNOBS variant, into kernels_ab1/, ...
T_PROFILE=${T_PROFILE:-40}  # 0: no step profile
T_PROFILE_L=${T_PROFILE_L:-0}  # >0: also profile L/16 96 px / 8 tokens (clipfast with the kernels, open_clip)
T_GRID=${T_GRID:-0}  # 0: no --grid gpu
T_DATA=${T_DATA:-0}  # >0: bench/data_path.py on this host's CPU (the data path's host cost per sample)
T_ACCUM=${T_ACCUM:-0}  # >0: bench/accum.py --graph (accumulation eager and as CUDA graphs)
read -r -a GRID_ARGS <<<"${GRID_ARGS:---grid gpu}"  # e.g. GRID_ARGS="--presets demo --sizes 32" for a dry run
read -r -a CLIPA_ARGS <<<"${CLIPA_ARGS:---grid clipa}"
SUITE_BUDGET=${SUITE_BUDGET:-585}  # seconds for the whole suite: the device tool stops a command at 600
SUITE_START=$(date +%s)

if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=${SITE:-/tmp/site}
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    then export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"; WHEELS="installed $(cd .whl && echo *.whl)"
    else WHEELS="wheel install FAILED"; fi
else
    WHEELS="no .whl folder: open_clip only if already installed"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the repo is used in place, not pip-installed
export PYTHONUNBUFFERED=1

DEVICE=$($PY -c "import sys, torch; sys.path.insert(0, 'bench'); import throughput as t
print(t.device_info(torch.device('cuda' if torch.cuda.is_available() else 'cpu'))[1])" 2>/dev/null \
    || nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z ' 'a-z-' \
    || echo unknown-device)
DATE=$(date -u +%F)
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export CLIPFAST_COMMIT=$COMMIT  # throughput.py records it (the tree on the GPU machine may have no .git)
DIR=${RESULTS_DIR:-bench/results/$DEVICE-$DATE}
# a folder holding an earlier run (the same device and day, or RESULTS_DIR reused) is moved aside, so that summary.md
# and results.tar.gz hold this run's parts only
if [ -d "$DIR" ] && [ -n "$(ls -A "$DIR" 2>/dev/null)" ]; then
    EARLIER="$DIR.before-$(date -u +%H%M%S)"
    mv "$DIR" "$EARLIER"
    echo "note: $DIR held an earlier run: moved to $EARLIER"
fi
mkdir -p "$DIR"
LOG=$DIR/suite.log
: >"$LOG"
STATUS=()

log() { echo "$*" | tee -a "$LOG"; }

# part NAME TIMEOUT_S COMMAND...: runs COMMAND under timeout into $DIR/NAME.log; never stops the suite. The timeout is
# cut to what is left of SUITE_BUDGET (less 15 s for the summary and the tarball), and a part with under 20 s left is
# skipped: a suite killed from outside would lose summary.md and results.tar.gz
part() {
    local name=$1 limit=$2 t0 rc left
    shift 2
    left=$(( SUITE_BUDGET - ($(date +%s) - SUITE_START) - 15 ))
    if [ "$left" -lt 20 ]; then
        log "=== $name: SKIPPED, ${left}s left of the suite's ${SUITE_BUDGET}s"
        STATUS+=("| $name | skipped (suite budget) | 0 s |")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    # @BUDGET@ in the command: the time budget of a throughput grid, 30 s under the timeout actually applied (the cut
    # one where the suite's budget cut it), so that the grid stops starting points before it is killed
    local budget=$(( limit > 45 ? limit - 30 : limit * 2 / 3 )) arg cmd=()
    for arg in "$@"; do [ "$arg" = "@BUDGET@" ] && cmd+=("$budget") || cmd+=("$arg"); done
    set -- "${cmd[@]}"
    t0=$(date +%s)
    log "=== $name (timeout ${limit}s): $*"
    timeout -k 10 "$limit" "$@" >"$DIR/$name.log" 2>&1
    rc=$?
    local dt=$(( $(date +%s) - t0 )) what=ok
    [ "$rc" -eq 0 ] || what="FAILED rc=$rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && what="TIMED OUT after ${limit}s (rc=$rc)"
    log "=== $name: $what in ${dt}s; last lines:"
    tail -n 4 "$DIR/$name.log" | awk '{print "    " $0}' | tee -a "$LOG"
    STATUS+=("| $name | $what | ${dt} s |")
}

log "device $DEVICE, date $DATE, commit $COMMIT, wheels: $WHEELS"
cat >"$DIR/env.sh" <<EOF
nvidia-smi
$PY -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda,
    torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA"); print("triton", triton.__version__)'
$PY -c 'import open_clip; print("open_clip", open_clip.__version__, open_clip.__file__)'
$PY -m pip list 2>/dev/null | grep -iE '^(torch|triton|open.clip|timm|ftfy|regex|pytest|pytest-benchmark|matplotlib|numpy) '
EOF
T_ENV=${T_ENV:-60}  # 0: no environment report (nvidia-smi, versions: ~20 s; the throughput tables name the versions)
[ "$T_ENV" -gt 0 ] && part env "$T_ENV" bash "$DIR/env.sh"

# tests that import neither DeepSpeed nor DALI (test_train, test_stages, test_data do); on CUDA, tests/conftest.py
# leaves TRITON_INTERPRET unset, so the kernels compile and run natively
# (not the tests/test_aot_*.py files: they compile for sm_90 without a GPU, so CI's run, and a local one on the GPU
# image's Triton with PYTHONPATH, say all they can; they took part of the 150 s that cut the 62cbe1a run short)
TESTS=(tests/test_graph.py tests/test_graph_accum.py tests/test_engine.py tests/test_dp.py tests/test_patch_embed.py tests/test_varlen_attention.py
       tests/test_short_attention.py tests/test_model.py tests/test_loss.py tests/test_flops.py tests/test_presets.py
       tests/test_interop.py tests/test_layer_norm.py tests/test_gelu.py tests/test_adamw.py tests/test_finish_sums.py
       tests/test_linear.py
       tests/test_overlap_optimizer.py tests/test_mlp.py)  # kernels.mlp (benchmarks only) last
[ -n "${SUITE_TESTS:-}" ] && read -r -a TESTS <<<"$SUITE_TESTS"  # e.g. only the files a change touched
EXISTING=()
for t in "${TESTS[@]}"; do [ -f "${t%%::*}" ] && EXISTING+=("$t"); done  # (a file, or a test in one: file::name)
# pytest-xdist (in the GPU image): a fresh machine compiles every Triton kernel first, and 8 workers do that in
# parallel (one process, cold: past 110 s on the H200 on 2026-11-26; warm: 86 s)
XDIST=()
"$PY" -c "import xdist" >/dev/null 2>&1 && XDIST=(-n 8)
[ "$T_TESTS" -gt 0 ] && part tests "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider -rfEs "${XDIST[@]}" \
    --continue-on-collection-errors --junitxml="$DIR/tests.xml" "${EXISTING[@]}"

BENCH_FILES=(bench/test_bench_*.py)
[ -n "${SUITE_BENCH:-}" ] && read -r -a BENCH_FILES <<<"$SUITE_BENCH"  # e.g. only bench/test_bench_optim.py
if [ "$T_BENCH" -lt "${#BENCH_FILES[@]}" ]; then
    log "T_BENCH=$T_BENCH: microbenchmarks skipped"
elif [ -e "${BENCH_FILES[0]}" ]; then
    per=$(( T_BENCH / ${#BENCH_FILES[@]} ))
    for f in "${BENCH_FILES[@]}"; do
        name=$(basename "$f" .py)
        # short rounds: ~180 cases must fit the budget; one file per run so a timeout loses only that file's JSON
        part "$name" "$per" "$PY" -m pytest -q -p no:cacheprovider "$f" --benchmark-only --benchmark-max-time=0.1 \
            --benchmark-min-rounds=5 --benchmark-json="$DIR/$name.json" --benchmark-columns=median,iqr,rounds
    done
else
    log "no bench/test_bench_*.py files: microbenchmarks skipped"
fi

# with DeepSpeed importable (bench/fetch_wheels.sh --deepspeed), the grids also time the trainer's DeepSpeed engine
if "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    [[ " ${GRID_ARGS[*]} " != *" --deepspeed "* ]] && GRID_ARGS+=(--deepspeed)
    [[ " ${CLIPA_ARGS[*]} " != *" --deepspeed "* ]] && CLIPA_ARGS+=(--deepspeed)
fi
# each grid stops starting new points 30 s before its timeout (@BUDGET@, in part) and writes its tables after every
# point
if [ "$T_CLIPA" -gt 30 ]; then
    part throughput_clipa "$T_CLIPA" "$PY" bench/throughput.py "${CLIPA_ARGS[@]}" --out "$DIR/clipa" \
        --time-budget @BUDGET@
fi
# CLIP.compile_blocks (torch.compile of each block's non-attention part) at the two goal points only, beside the
# eager step (open_clip's ratio is in clipa/): its first step compiles, which would cost the full grid its last points
if [ "$T_COMPILE" -gt 30 ]; then
    part throughput_compile "$T_COMPILE" "$PY" bench/throughput.py --points B/16:112:16 L/16:96:8 --compile \
        --no-cuda-graph --no-open-clip --out "$DIR/compile" --time-budget @BUDGET@
fi
# the opt-in kernels (kernels.layer_norm: dW, dB fused into dx's pass, and add_layer_norm with the residual add
# before each norm; kernels.linear_gelu: the GELU backward writes the c_fc bias gradient; kernels.short_attention: one
# tile per
# sequence and head for the image tower) at the two goal points, interleaved with the plain eager step ("kernels /
# clipfast"); at 87ad763 torch's layer norms took 12.4 and the vision attention 8.8 of 85.3 ms per B/16 step.
# The microbenchmarks (test_bench_layer_norm, test_bench_short_attention) time each kernel by itself
# Columns: clipfast, open_clip, graphs+kernels (the goal's number), graphs, eager kernels; on an 80 GB H100 the L/16
# points cannot hold all five (about 23 GB each), and the last built are left out (dab88c7: both L/16 points were lost)
if [ "$T_KERNELS" -gt 30 ]; then
    read -r -a KERNELS_ARGS <<<"${KERNELS_ARGS:-}"  # e.g. KERNELS_ARGS="--kernels-mlp triton_gemm"
    part throughput_kernels "$T_KERNELS" "$PY" bench/throughput.py --points B/16:112:16 L/16:96:8 --kernels \
        --out "$DIR/kernels" --time-budget @BUDGET@ "${KERNELS_ARGS[@]}"
fi
# the same two points again, graphs+kernels (and the plain eager column every ratio needs) only, once per variant of
# AB_KNOBS: variants split by ";", each a list of kernel switches (bench/steps.py KNOBS), an empty one the defaults.
# Default: the defaults; the optimizer after the backward (graph.OVERLAP_OPTIMIZER=0); the launches as they were
# before 3c598c1's session (the optimizer one tensor per launch, the partial sums finished by torch). Into
# kernels_ab1/, kernels_ab2/, ...: the step-level effect of changes not yet timed on a GPU, on the same warm machine
if [ "$T_AB" -gt 30 ]; then
    IFS=';' read -r -a AB_VARIANTS <<<"${AB_KNOBS:- ; graph.OVERLAP_OPTIMIZER=0 ; adamw.SLOTS=1 _common.FINISH=torch}"
    ab=0
    for variant in "${AB_VARIANTS[@]}"; do
        ab=$(( ab + 1 ))
        read -r -a knobs <<<"$variant"
        part "throughput_kernels_ab$ab" "$T_AB" "$PY" bench/throughput.py --points B/16:112:16 L/16:96:8 --kernels \
            --no-open-clip --skip clipfast_graph clipfast_kernels --out "$DIR/kernels_ab$ab" \
            --time-budget @BUDGET@ ${knobs[@]+--knob "${knobs[@]}"}
    done
    # the variants side by side (graphs+kernels ms, MFU, change against the first, ratio to open_clip in kernels/)
    AB_DIRS=()
    for f in "$DIR"/kernels_ab*/throughput.json; do [ -f "$f" ] && AB_DIRS+=("$(dirname "$f")"); done
    if [ "${#AB_DIRS[@]}" -gt 0 ]; then
        REF=(); [ -f "$DIR/kernels/throughput.json" ] && REF=(--open-clip "$DIR/kernels")
        "$PY" bench/report.py --ab "${AB_DIRS[@]}" ${REF[@]+"${REF[@]}"} >"$DIR/ab.md" 2>>"$LOG" || rm -f "$DIR/ab.md"
    fi
fi
# launch-config sweep of the opt-in kernels (each config checked against the default, then timed; torch beside)
if [ "$T_SWEEP" -gt 0 ]; then
    read -r -a SWEEP_ARGS <<<"${SWEEP_ARGS:-}"  # e.g. SWEEP_ARGS="--kernels adamw"
    part sweep "$T_SWEEP" "$PY" bench/sweep_kernels.py --out "$DIR/sweep" "${SWEEP_ARGS[@]}"
fi
# where a CLIPA step's device time goes (kernel groups, busy share): clipfast without and with the opt-in kernels,
# open_clip
if [ "$T_PROFILE" -gt 0 ]; then
    read -r -a PROFILE_IMPLS <<<"${PROFILE_IMPLS:-clipfast clipfast_kernels open_clip}"
    part profile "$T_PROFILE" "$PY" bench/profile_step.py --impls "${PROFILE_IMPLS[@]}" --out "$DIR"
fi
# the same at the other goal point, L/16 96 px / 8 tokens, batch 512, into profile_l16/, and the CUDA-graph step with
# the kernels (what the goal column runs: its optimizer is kernels.adamw, the eager step's torch's AdamW between two
# casts). Untried on a GPU as of f0bc99c: if the profiler misses kernels replayed from a graph, that table shows it
if [ "$T_PROFILE_L" -gt 0 ]; then
    read -r -a PROFILE_L_IMPLS <<<"${PROFILE_L_IMPLS:-clipfast_kernels clipfast_graph_kernels open_clip}"
    part profile_l16 "$T_PROFILE_L" "$PY" bench/profile_step.py --preset L/16 --size 96 --text-len 8 --batch 512 \
        --impls "${PROFILE_L_IMPLS[@]}" --out "$DIR/profile_l16"
fi
if [ "$T_GRID" -gt 30 ]; then
    part throughput "$T_GRID" "$PY" bench/throughput.py "${GRID_ARGS[@]}" --out "$DIR" --time-budget @BUDGET@
fi
if [ "$T_DATA" -gt 0 ]; then
    part data_path "$T_DATA" "$PY" bench/data_path.py --no-loader --samples 2000 --per-shard 250 \
        --reader-processes 2 4 --out "$DIR/data_path"
fi
if [ "$T_ACCUM" -gt 0 ]; then
    part accum "$T_ACCUM" "$PY" bench/accum.py --preset B/16 --image-size 112 --text-len 16 --batch 1024 --accum 1 4 \
        --steps 5 --graph --out "$DIR/accum"
fi

{
    echo "# GPU suite: $DEVICE, $DATE, commit $COMMIT"
    echo
    echo "wheels: $WHEELS; total $(( $(date +%s) - SUITE_START )) s"
    echo
    echo "| part | result | time |"
    echo "|---|---|---|"
    printf '%s\n' "${STATUS[@]}"
    echo
    grep -E "passed|failed|error" "$DIR/tests.log" 2>/dev/null | tail -n 1
    echo
    [ -f "$DIR/clipa/throughput.md" ] && { echo "## CLIPA goal points"; echo; cat "$DIR/clipa/throughput.md"; echo; }
    [ -f "$DIR/compile/throughput.md" ] && { echo "## Compiled blocks at the goal points"; echo
                                              cat "$DIR/compile/throughput.md"; echo; }
    [ -f "$DIR/kernels/throughput.md" ] && { echo "## clipfast's opt-in kernels at the goal points"; echo
                                              cat "$DIR/kernels/throughput.md"; echo; }
    [ -f "$DIR/ab.md" ] && { echo "## AB_KNOBS variants side by side (graphs+kernels)"; echo; cat "$DIR/ab.md"; echo; }
    for f in "$DIR"/kernels_ab*/throughput.md; do
        [ -f "$f" ] && { echo "## The same points, graphs+kernels, AB_KNOBS variant $(basename "$(dirname "$f")")"
                         echo; cat "$f"; echo; }
    done
    [ -f "$DIR/profile.md" ] && { echo "## Step profile"; echo; cat "$DIR/profile.md"; echo; }
    [ -f "$DIR/profile_l16/profile.md" ] && { echo "## Step profile, L/16"; echo; cat "$DIR/profile_l16/profile.md"
                                               echo; }
    [ -f "$DIR/sweep/sweep.md" ] && { echo "## Kernel launch configs"; echo; cat "$DIR/sweep/sweep.md"; echo; }
    [ -f "$DIR/accum/accum.md" ] && { echo "## Accumulation, eager and graphed"; echo; cat "$DIR/accum/accum.md"; echo; }
    [ -f "$DIR/throughput.md" ] && { echo "## Grid"; echo; cat "$DIR/throughput.md"; }
} >"$DIR/summary.md"
log "wrote $DIR (total $(( $(date +%s) - SUITE_START )) s)"

if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
    COPIED=()
    cp "$DIR/summary.md" "$OUT/" 2>/dev/null && COPIED+=(summary.md)
    cp "$DIR/throughput.png" "$OUT/" 2>/dev/null && COPIED+=(throughput.png)
    cp "$DIR/clipa/throughput.png" "$OUT/throughput_clipa.png" 2>/dev/null && COPIED+=(throughput_clipa.png)
    tar czf "$OUT/results.tar.gz" -C "$(dirname "$DIR")" "$(basename "$DIR")" && COPIED+=(results.tar.gz)
    log "copied ${COPIED[*]} to \$OUT"
fi
exit 0
