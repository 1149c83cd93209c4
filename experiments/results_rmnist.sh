#!/usr/bin/env bash
# The paper's analyses in miniature (docs/results.md): on the bundled RotatedMNIST 5k subset,
# one W3/A3 FQAT run (experiments/results_rmnist_w3.cfg) inside a 2 x 2 (K, r) grid, its
# LSQ+SAGM twin (same seed, same cached ERM stage, only --method differs), then every analysis
# program on them. Runs go to runs/results/sweep, figures and tables to docs/results/.
#
#   bash experiments/results_rmnist.sh          # PYTHON=... to choose the interpreter
#
# About 30 minutes on 2 CPU cores, no download. Rerunning skips finished runs (the training
# program resumes or skips them) and redraws every figure and table.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
CFG=experiments/results_rmnist_w3.cfg
SWEEP=runs/results/sweep
OUT=docs/results
# The cfg's own point (K = 20, r = 0.35) is one cell of the grid: that run is the FQAT run.
GRID="freeze_interval=20,30;freeze_threshold=0.25,0.35"
FQAT_RUN=$SWEEP/results_rmnist_w3__freeze_interval-20__freeze_threshold-0.35/75/seed0
TWIN_RUN=$SWEEP/lsq_sagm/75/seed0
mkdir -p "$OUT"

# copy SRC DEST: for figures whose program has no --out; a temporary name, then a rename.
copy() {
    cp "$1" "$2.tmp" && mv "$2.tmp" "$2"
}

# A committed figure stays under 200 KB: a larger PNG is re-encoded with a 256-colour palette
# (the same picture; matplotlib writes 24-bit colour), to a temporary name, then renamed.
shrink() {
    "$PY" - "$@" <<'PYEOF'
import os
import sys

from PIL import Image

for path in sys.argv[1:]:
    if os.path.getsize(path) > 200_000:
        image = Image.open(path).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
        image.save(path + ".tmp", format="PNG", optimize=True)
        os.replace(path + ".tmp", path)
        print(f"re-encoded {path} with a palette: {os.path.getsize(path)} bytes")
PYEOF
}

echo "== training: ERM stage, the FQAT (K, r) grid, the LSQ+SAGM twin"
"$PY" -m fqat_tf.sweep --flagfile="$CFG" --sweep_dir="$SWEEP" --test_domains=75 --seeds=0 \
    --grid="$GRID" -- --verbose=0
"$PY" -m fqat_tf.train --flagfile="$CFG" --method=lsq_sagm --output_dir="$TWIN_RUN" \
    --erm_cache_dir="$SWEEP/erm_cache" --verbose=0

erm_runs=("$SWEEP"/erm_cache/*/model.keras)
if [ "${#erm_runs[@]}" -ne 1 ]; then
    echo "expected one ERM stage in $SWEEP/erm_cache, found ${#erm_runs[@]}" >&2
    exit 1
fi
ERM_RUN=$(dirname "${erm_runs[0]}")

echo "== Fig. 2, 3, 5: the FQAT run's gradients and disorder"
"$PY" -m fqat_tf.plots run "$FQAT_RUN"
copy "$FQAT_RUN/gradients.png" "$OUT/fig2_gradients.png"
copy "$FQAT_RUN/disorder.png" "$OUT/fig3_disorder.png"
copy "$FQAT_RUN/freeze_timeline.png" "$OUT/freeze_timeline.png"

echo "== Fig. 4: applied scale gradients, FQAT against LSQ+SAGM"
"$PY" -m fqat_tf.plots compare "$FQAT_RUN" "$TWIN_RUN" --out "$OUT/fig4_compare.png"

echo "== Fig. 6 and Tables 5-26: the (K, r) grid against LSQ+SAGM"
"$PY" -m fqat_tf.report "$SWEEP" --heatmap "$OUT/fig6_heatmap.png" --out "$OUT/table.md"
"$PY" -m fqat_tf.report "$SWEEP" --split val --out "$OUT/table_val.md"
"$PY" -m fqat_tf.report "$SWEEP" --split test --out "$OUT/table_test.md"

echo "== Table 3: scale sensitivity of the FQAT run"
"$PY" -m fqat_tf.scale_sensitivity "$FQAT_RUN" --factors=0.9,0.95,1.05,1.1 \
    --out "$OUT/table3_scale_sensitivity"

echo "== Fig. 1, 7, 8: loss landscapes of ERM, LSQ+SAGM and FQAT"
"$PY" -m fqat_tf.landscape "$ERM_RUN" "$TWIN_RUN" "$FQAT_RUN" --out "$OUT/fig7_landscape.png"

shrink "$OUT"/*.png
echo "== done in ${SECONDS} s"
