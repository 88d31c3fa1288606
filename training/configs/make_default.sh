#!/usr/bin/env bash
# The recipe of weights/default, end to end: dfx prepare ... + dfx train + dfx export (see default.yaml beside this
# file and weights/default/MODEL_CARD.md). Every step is resumable: rerun the script after an interruption.
#   bash training/configs/make_default.sh            # writes runs/default/... and then weights/default
# DATA (default ../shared/data), WORK (default runs/default), OUT (default weights/default) and DFX override paths.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data}
WORK=${WORK:-runs/default}
OUT=${OUT:-weights/default}
DFX=${DFX:-.venv/bin/dfx}
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1
mkdir -p "$WORK"
step() { echo "== $(date -u +%H:%M:%S) $*" >&2; }

# 1. The images, in cluster-disjoint folds (FAISS k-means on colour and spectrum statistics, no weights needed):
#    a fold holds whole clusters, so validating on one measures kinds of image the experts never saw.
step merge;   "$DFX" prepare merge "$DATA/dev/manifest.csv" "$DATA/more/manifest.csv" -o "$WORK/all.csv"
step embed;   "$DFX" prepare embed "$WORK/all.csv" --backbone handcrafted -o "$WORK/embed.npy"
step cluster; "$DFX" prepare cluster "$WORK/all.csv" --features "$WORK/embed.npy" --k 40 --folds 4 --seed 0 \
                -o "$WORK/folds.csv"
# 2. Self-blended faces from the reals (face swaps without a generator; each keeps its real's fold), and the face
#    crops of every image and every blend, cut by one finder and framing so that a crop is no cue.
step blend;   "$DFX" prepare blend --reals "$WORK/folds.csv" --out "$WORK/sbi" --per-image 2 --seed 0
step merge;   "$DFX" prepare merge "$WORK/folds.csv" "$WORK/sbi/manifest.csv" -o "$WORK/with_sbi.csv"
step faces;   "$DFX" prepare faces "$WORK/with_sbi.csv" -o "$WORK/faces" --finder retinaface
# 3. Local edits of the reals (splice, copy-move, inpaint, resample), each with its mask, as JPEG like the camera
#    photos they are compared with (a PNG-only class would be a format shortcut), for the map expert, which also
#    learns from the blends' masks.
step edit;    "$DFX" prepare edit --reals "$WORK/folds.csv" --out "$WORK/edits" --format jpg --seed 0
step merge;   "$DFX" prepare merge "$WORK/with_sbi.csv" "$WORK/edits/manifest.csv" -o "$WORK/local.csv"
[ "${STEPS:-all}" = prep ] && { step "prepared (STEPS=prep)"; exit 0; }
# 4. The experts (CE + KL + NCE through Accelerate), then the bundle.
step train
if [ -f "$WORK/run/run.json" ]; then echo "trained already: $WORK/run" >&2
else "$DFX" train training/configs/default.yaml output="$WORK/run" $([ -d "$WORK/run" ] && echo --resume); fi
step export;  "$DFX" export "$WORK/run" --out "$OUT" --name default --force
step done
