#!/usr/bin/env bash
# The full-size DeepSeekMoE-16B (random weights in the published shapes, 28 layers, 7 shards) on
# this machine at bf16, 8-bit and 4-bit. Not run in CI: it writes ~33 GB (bf16) + ~17 GB (int8)
# + ~9 GB (int4) under $MOE_FULL16B_DIR (default ~/.cache/moe_engine/full16b), made once, reused.
#
#   bash bench/full16b.sh      # env: THREADS (2), GEN new tokens (32), PROMPT prefill tokens (512)
#
# Per format: load time, peak resident memory, prefill and decode tokens/s, then `lens routing` on
# a short text. bf16 is expected to be refused by the memory preflight on a 24 GiB machine; the
# refusal line with its numbers is that row's result.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DIR=${MOE_FULL16B_DIR:-$HOME/.cache/moe_engine/full16b}
THREADS=${THREADS:-2}
GEN=${GEN:-32}
PROMPT=${PROMPT:-512}
PRESET=${PRESET:-16b}  # PRESET=tiny tries the script in seconds
mkdir -p "$DIR"

[ -f "$DIR/bf16/config.json" ] || python tools/make_checkpoint.py "$DIR/bf16" --preset "$PRESET" || exit 1
# group size 64: the dense layer's down_proj has K = 10944, not a multiple of 128, which some
# GPTQ readers refuse (docs/quantization.md); ours would take 128 too
[ -f "$DIR/int8/config.json" ] || python -m moe_engine.quantize "$DIR/bf16" "$DIR/int8" --bits 8 --group-size 64 || exit 1
[ -f "$DIR/int4/config.json" ] || python -m moe_engine.quantize "$DIR/bf16" "$DIR/int4" --bits 4 --group-size 64 || exit 1

TEXT="$DIR/lens-text.txt"
[ -f "$TEXT" ] || python -c "
w = 'the quick brown fox jumps over the lazy dog while the river runs to the sea'.split()
open('$TEXT', 'w').write('\n\n'.join(' '.join(w[(i + j) % len(w)] for j in range(200)) for i in range(8)))"

for fmt in bf16 int8 int4; do
  echo "=== $fmt ==="
  if python - "$DIR/$fmt" "$THREADS" "$GEN" "$PROMPT" <<'PY'
import resource, sys, time
import torch
import moe_engine
path, threads, gen, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
gib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
t0 = time.perf_counter()
try:
    model = moe_engine.load(path, progress=False, context=prompt + gen)
except (RuntimeError, ValueError) as e:
    print(f"refused: {e}")
    sys.exit(1)
print(f"load {time.perf_counter() - t0:.1f} s, peak RSS after load {gib():.2f} GiB, backend {model.backend}")
ids = torch.randint(0, model.config.vocab_size - 2, (1, prompt))
cache = model.new_cache(1, prompt + gen + 1)
t0 = time.perf_counter()
logits = model.forward(ids, cache=cache, logits="last")
t_pre = time.perf_counter() - t0
tok = logits.argmax(-1).view(1, 1)
tok = model.forward(tok, cache=cache, logits="last").argmax(-1).view(1, 1)  # warm-up: workspaces
t0 = time.perf_counter()
for _ in range(gen - 1):
    tok = model.forward(tok, cache=cache, logits="last").argmax(-1).view(1, 1)
t_dec = time.perf_counter() - t0
print(f"prefill {prompt / t_pre:.1f} tok/s, decode {(gen - 1) / t_dec:.2f} tok/s, peak RSS {gib():.2f} GiB")
PY
  then
    python -m moe_engine.lens routing --model "$DIR/$fmt" --out "$DIR/lens-$fmt" --threads "$THREADS" \
      --no-progress "$TEXT" 2>&1 | tail -n 3
  fi
done
