#!/usr/bin/env bash
# The full-size DeepSeekMoE-16B (random weights in the published shapes, 28 layers, 7 shards) on
# this machine at bf16, 8-bit and 4-bit. Not run in CI: it writes ~33 GB (bf16) + ~17 GB (int8)
# + ~9 GB (int4) under $MOE_FULL16B_DIR (default ~/.cache/moe_engine/full16b), made once, reused.
#
#   bash bench/full16b.sh      # env: THREADS (2), GEN new tokens (32), PROMPT prefill tokens (512),
#                              # FORMATS (bf16 int8 int4 int4-on-load), LM_HEAD_INT8 (0; 1: every
#                              # format quantizes the lm_head to 8 bits on load, --quant-lm-head)
#
# Per format one bench/throughput.py run (load time, peak resident memory, prefill and decode
# tokens/s, the fraction of the bandwidth floor; its JSON goes to $DIR/FORMAT.json), then
# `lens routing` on a short text. bf16 is expected to be refused by the memory preflight on a
# 24 GiB machine; the refusal line with its numbers is that row's result. int4-on-load quantizes
# the bf16 checkpoint while loading it (load(quant="int4"), group size 64 as the int4 checkpoint).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DIR=${MOE_FULL16B_DIR:-$HOME/.cache/moe_engine/full16b}
THREADS=${THREADS:-2}
GEN=${GEN:-32}
PROMPT=${PROMPT:-512}
FORMATS=${FORMATS:-bf16 int8 int4 int4-on-load}
PRESET=${PRESET:-16b}  # PRESET=tiny tries the script in seconds
mkdir -p "$DIR"

[ -f "$DIR/bf16/config.json" ] || python tools/make_checkpoint.py "$DIR/bf16" --preset "$PRESET" || exit 1
# group size 64: the dense layer's down_proj has K = 10944, not a multiple of 128, which some
# GPTQ readers refuse (docs/quantization.md); ours would take 128 too
for bits in 8 4; do
  [ -f "$DIR/int$bits/config.json" ] || /usr/bin/time -f "quantized to int$bits in %e s, peak resident %M KiB" \
    python -m moe_engine.quantize "$DIR/bf16" "$DIR/int$bits" --bits $bits --group-size 64 || exit 1
done

TEXT="$DIR/lens-text.txt"
[ -f "$TEXT" ] || python -c "
w = 'the quick brown fox jumps over the lazy dog while the river runs to the sea'.split()
open('$TEXT', 'w').write('\n\n'.join(' '.join(w[(i + j) % len(w)] for j in range(200)) for i in range(8)))"

for fmt in $FORMATS; do
  echo "=== $fmt ==="
  case $fmt in
    int4-on-load) src=bf16 q=(--quant int4 --group-size 64) ;;
    *) src=$fmt q=() ;;
  esac
  [ "${LM_HEAD_INT8:-0}" = 1 ] && q+=(--quant-lm-head)
  if python bench/throughput.py --model "$DIR/$src" "${q[@]}" --threads "$THREADS" --prompt-len "$PROMPT" \
       --gen-len "$GEN" --reps 1 --moe-tokens 1 --json >"$DIR/$fmt.out" 2>"$DIR/$fmt.err"; then
    tail -n 1 "$DIR/$fmt.out" >"$DIR/$fmt.json"
    python - "$DIR/$fmt.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"load {r['load_s']:.1f} s, resident after load {r['rss_after_load_gib']:.2f} GiB (peak "
      f"{r['peak_rss_gib']:.2f}), prefill {r['prefill_tok_s']:.1f} tok/s, decode "
      f"{r['decode_tok_s']:.2f} tok/s = {r['bandwidth_floor_fraction']:.0%} of the floor "
      f"({r['decode_bytes_per_step'] / 1e9:.2f} GB per step at {r['decode_read_bandwidth_gb_s']:.1f} GB/s)")
PY
    python -m moe_engine.lens routing --model "$DIR/$src" "${q[@]}" --out "$DIR/lens-$fmt" \
      --threads "$THREADS" --no-progress "$TEXT" 2>&1 | tail -n 3
  else
    echo "refused or failed: $(grep -v '^$' "$DIR/$fmt.err" | tail -n 1)"
  fi
done
