#!/usr/bin/env bash
# One device check: does stainmil feed the GPU? Prints one table (figures in $OUT/*.json, $OUT/gpu_check.md).
#
#   benchmarks/gpu_check.sh                 # on a GPU machine: demo preset, 224 px, random weights (~5 min)
#   benchmarks/gpu_check.sh --device cpu --small    # the same steps at toy sizes, a ViT-S for the ViT-L
#   benchmarks/gpu_check.sh --dry-run ...           # print each step's `stainmil bench` mode and arguments
#                                                   # (the tests run those steps in one process, then the table)
#
# Needs the repository and a Python with torch and stainmil's dependencies (PYTHON=..., default python3); no
# network: every encoder has random weights. Rows: bare forward at the extraction batch and at the best batch,
# extraction from PNGs and from slides (DenseNet121, uni_v1 = ViT-L/16), the feed alone (no encoder) per decode
# workers, the store epoch vs the old way, the head (vectorised vs nested loop vs its projector floor), and
# training from the bounded store vs the whole store in memory at 1x and 3x.
set -euo pipefail
DEVICE=cuda
SMALL=0
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --small) SMALL=1; shift ;;
    --dry-run) DRY=1; shift ;;
    *) echo "usage: $0 [--device cuda|cpu] [--small] [--dry-run]" >&2; exit 2 ;;
  esac
done
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="${OUT:-$HERE/gpu_check_out}"
export PYTHONPATH="$HERE/src${PYTHONPATH:+:$PYTHONPATH}" STAINMIL_PROGRESS=0
if [ "$SMALL" = 1 ]; then
  PRESET=tiny; SIZE=32; ROUNDS=1; SCALE_CASES=12; OLD=2; VIT=kaiko_vits16; IN_MEMORY=1
else
  PRESET=demo; SIZE=224; ROUNDS=2; SCALE_CASES=86; OLD=4; VIT=uni_v1; IN_MEMORY=10
fi
step() {  # step LOG MODE ARGS…: one `stainmil bench MODE` run, its output in $OUT/LOG; a failure shows the
  local log="$OUT/$1" mode="$2"; shift 2                                            # log's end and stops
  local args=(--device "$DEVICE" --out "$OUT")
  [ "$mode" = scale ] || args+=(--image-size "$SIZE")
  [ "$mode" = training ] && args+=(--rounds "$ROUNDS")
  if [ "$DRY" = 1 ]; then
    echo "$mode ${args[*]} $*"
    return
  fi
  echo "gpu_check: stainmil bench $mode $*" >&2
  if ! "$PY" -m stainmil bench "$mode" "${args[@]}" "$@" > "$log" 2>&1; then
    tail -20 "$log" >&2
    echo "gpu_check: failed: stainmil bench $mode $* (log: $log)" >&2
    exit 1
  fi
}
[ "$DRY" = 1 ] || mkdir -p "$OUT"
start=$SECONDS
step log-densenet-pngs.txt   training --preset "$PRESET" --backbone densenet121 --old-cases "$OLD"
step log-densenet-slides.txt training --preset "$PRESET" --backbone densenet121 --slides --extraction-only
step log-vit-pngs.txt        training --preset "$PRESET" --backbone "$VIT" --extraction-only
step log-vit-slides.txt      training --preset "$PRESET" --backbone "$VIT" --slides --extraction-only
step log-feed.txt            feed --preset "$PRESET" --slides
step log-scale.txt           scale --scales 1,3 --scale-cases "$SCALE_CASES" --epochs 2 --memory-up-to "$IN_MEMORY"
[ "$DRY" = 1 ] && exit 0
"$PY" "$HERE/benchmarks/gpu_table.py" "$OUT" "$DEVICE" "$PRESET" "$SIZE" $((SECONDS - start)) "$VIT"
