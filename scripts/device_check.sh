#!/usr/bin/env bash
# The accelerator check for one NVIDIA GPU machine (H100/H200, its own jax 0.11 / CUDA 13
# image, Python 3.12, no internet), in <= 8 minutes. Writes a Markdown summary for
# docs/benchmarks.md, with the device named, and the full logs.
#
#     bash scripts/fetch_device_wheels.sh      # here, once: device_wheels/ (ignored by git)
#     bash scripts/device_check.sh [OUT_DIR]   # there; OUT_DIR defaults to $OUT, else /tmp
#     DEVICE_CHECK_SMOKE=1 bash scripts/device_check.sh /tmp/dc   # tiny shapes, any machine
#
# What it runs, each part under its own time limit (a part that fails or runs out of time is
# recorded as such; the rest still runs):
#   1. the wheels of device_wheels/ whose distributions this Python lacks, installed with pip
#      --no-index --no-deps into a private directory (the image's jax and packages untouched);
#      the project runs from this checkout on PYTHONPATH
#   2. the model, loss and generation tests (tests/test_models.py, test_losses.py,
#      test_generation.py) on the GPU
#   3. scripts/bench_train.py at the GPT-2 124M shape (T = 1024, bf16, batch 16): tokens/s and
#      MFU against PEAK_TFLOPS (989: H100 SXM dense bf16), once with XLA attention and once with
#      cuDNN attention (CUDNN_ATTENTION, the kernels/ name; skipped when this checkout has none)
#   4. scripts/bench_generate.py at the GPT-2 shape (needs torch for its HF comparison; without
#      torch our generation alone is timed)
#   5. one distillation block stage and the head stage at the GPT-2 shape (GPT-2 124M teacher
#      with random weights, 6 x 768 student, T = 1024, batch 8): their step times
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

CUDNN_ATTENTION="cudnn"   # model.attention's name for jax.nn.dot_product_attention(cudnn)
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
SMOKE="${DEVICE_CHECK_SMOKE:-0}"
WHEELS="${DEVICE_WHEELS:-$REPO/device_wheels}"
PY="${PYTHON:-python3}"
OUT_DIR="${1:-${OUT:-/tmp}/device_check}"
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.md"
SITE="$(mktemp -d)/site"
START=$(date +%s)

note() { echo "$*" | tee -a "$SUMMARY"; }

# part NAME SECONDS COMMAND...: run COMMAND with a time limit, its output in OUT_DIR/NAME.log;
# the summary gets the outcome and the log's lines that match $KEEP.
part() {
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*" >&2
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  local outcome="ok"
  [ $rc -eq 124 ] && outcome="TIMED OUT after ${limit}s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && outcome="FAILED (exit $rc)"
  note ""
  note "### $name: $outcome, $(( $(date +%s) - t0 ))s"
  note '```'
  note "$*"
  grep -E "${KEEP:-.}" "$OUT_DIR/$name.log" | tail -n "${KEEP_LINES:-15}" | tee -a "$SUMMARY"
  note '```'
}

: > "$SUMMARY"
SHAPES=$( [ "$SMOKE" = 1 ] && echo "SMOKE: tiny shapes" || echo "GPT-2 shapes")
note "# Device check ($SHAPES)"
note ""
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
note "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT"

# 1. dependencies: the carried wheels this Python does not have yet.
mkdir -p "$SITE"
MISSING=$("$PY" - "$WHEELS" <<'EOF'
import glob, os, re, sys
from importlib import metadata

def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()

have = {canonical(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]}
for wheel in sorted(glob.glob(os.path.join(sys.argv[1], "*.whl"))):
    if canonical(os.path.basename(wheel).split("-")[0]) not in have:
        print(wheel)
EOF
)
if [ -n "$MISSING" ]; then
  # shellcheck disable=SC2086
  "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" $MISSING \
    > "$OUT_DIR/install.log" 2>&1 || note "installing the carried wheels failed: see install.log"
fi
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
note "installed from $WHEELS: $(echo "$MISSING" | grep -c . ) wheels"

KEEP="." KEEP_LINES=20 part environment 30 "$PY" - <<'EOF'
import jax, flax, optax, platform
print(f"python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
      f"optax {optax.__version__}")
print(f"backend {jax.default_backend()}: {jax.device_count()} x {jax.devices()[0].device_kind}")
for d in jax.devices()[:1]:
    stats = d.memory_stats() or {}
    if "bytes_limit" in stats:
        print(f"memory per device: {stats['bytes_limit'] / 2**30:.1f} GiB")
EOF

if [ "$SMOKE" = 1 ]; then
  TESTS=(tests/test_losses.py)
  TRAIN_SHAPE=(--n_layer 1 --n_embd 64 --n_head 2 --block_size 64 --vocab_size 256 --batch 2
               --steps 1 --repeats 1 --warmup 1)
  GEN_ARGS=(--cases char --batch 1 --new_tokens 8 --repeats 1)
  DISTILL_SHAPE="1 2 64 64 256 2"     # student layers, heads, width, T, vocab, batch
  LIMITS=(240 120 120 120 240)
else
  TESTS=(tests/test_models.py tests/test_losses.py tests/test_generation.py)
  TRAIN_SHAPE=(--steps 10 --repeats 3 --warmup 2)
  GEN_ARGS=(--cases gpt2 --batch 1,8 --new_tokens 128 --repeats 2 --hf_threads 8)
  DISTILL_SHAPE="6 12 768 1024 50257 8"
  LIMITS=(110 90 90 80 60)   # tests, train xla, train cudnn, generate, distill: with ~50s of
  #                            set-up, 8 minutes at most
fi

# 2. the tests (a failure on the GPU is a finding: the summary lists it).
KEEP="passed|failed|error|FAILED|ERROR" part tests "${LIMITS[0]}" \
  "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"

# 3. training speed, XLA attention then cuDNN attention.
KEEP="tok/s|MFU|\|" part bench_train_xla "${LIMITS[1]}" \
  "$PY" scripts/bench_train.py --preset gpt2_124m "${TRAIN_SHAPE[@]}" \
  --peak_tflops "$PEAK_TFLOPS" --attention xla --json "$OUT_DIR/bench_train_xla.json"
BACKEND=$("$PY" -c "import jax; print(jax.default_backend())" 2>/dev/null)
if [ "$BACKEND" != gpu ]; then
  note ""
  note "### bench_train_cudnn: skipped, cuDNN needs a GPU (JAX's backend here: ${BACKEND:-none})"
elif "$PY" -c "import sys; from cleangpt_jax import kernels; \
sys.exit('$CUDNN_ATTENTION' not in kernels.ATTENTION_SETTINGS)" 2>/dev/null; then
  KEEP="tok/s|MFU|\|" part bench_train_cudnn "${LIMITS[2]}" \
    "$PY" scripts/bench_train.py --preset gpt2_124m "${TRAIN_SHAPE[@]}" \
    --peak_tflops "$PEAK_TFLOPS" --attention "$CUDNN_ATTENTION" \
    --json "$OUT_DIR/bench_train_cudnn.json"
else
  note ""
  note "### bench_train_cudnn: skipped, model.attention has no '$CUDNN_ATTENTION' in this checkout"
fi

# 4. generation speed.
if "$PY" -c "import torch, transformers" 2>/dev/null; then
  KEEP="tok/s|ours /|\[" part bench_generate "${LIMITS[3]}" \
    "$PY" scripts/bench_generate.py "${GEN_ARGS[@]}"
else
  KEEP="tok/s" part generate_no_torch "${LIMITS[3]}" "$PY" - "$SMOKE" <<'EOF'
import sys, time
import jax, numpy as np
from cleangpt_jax.config import model_config
from cleangpt_jax.generation import generate
from cleangpt_jax.models import get_model
from cleangpt_jax.train_step import model_init_fn

smoke = sys.argv[1] == "1"
shape = (dict(n_layer=1, n_head=2, n_embd=64, vocab_size=256, block_size=64) if smoke else
         dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024))
model = get_model(config=model_config(dict(model_type="vanilla", bias=True,
                                           activation="gelu_tanh", **shape)))
params = jax.jit(model_init_fn(model, 0))()
new = 8 if smoke else 256
print("torch is missing: HF's comparison skipped; greedy decoding, 16-token prompts")
for batch in (1, 8):
    prompt = np.random.default_rng(0).integers(0, shape["vocab_size"], (batch, 16))
    run = lambda: generate(model, params, prompt, new, temperature=0.0).tokens.block_until_ready()
    run()
    times = []
    for _ in range(3):
        t0 = time.perf_counter(); run(); times.append(time.perf_counter() - t0)
    print(f"ours batch {batch}: {batch * new / sorted(times)[1]:.1f} tok/s "
          f"({new} new tokens, median of 3)")
EOF
fi

# 5. distillation stages: the block stage and the head stage, real steps on this device.
KEEP="step|stage|teacher" part distill_stages "${LIMITS[4]}" "$PY" - $DISTILL_SHAPE <<'EOF'
import sys, time
import jax, jax.numpy as jnp
from cleangpt_jax import compile as compile_lib
from cleangpt_jax.distill import config as distill_config

layers, heads, width, block_size, vocab, batch = map(int, sys.argv[1:7])
cfg = distill_config.get_config()
cfg.model.update(model_type="vanilla", n_layer=layers, n_head=heads, n_embd=width,
                 block_size=block_size, dropout=0.0, bias=True, activation="gelu_tanh",
                 dtype="bfloat16")
cfg.train.batch_size = batch
cfg.distill.teacher = "gpt2" if vocab == 50257 else "_tiny"
if vocab != 50257:  # smoke: a tiny GPT-2-shaped teacher described by its config.json
    import json, os, tempfile
    cfg.distill.teacher = tempfile.mkdtemp()
    with open(os.path.join(cfg.distill.teacher, "config.json"), "w") as f:
        json.dump(dict(model_type="gpt2", n_layer=2 * layers, n_head=heads, n_embd=width,
                       n_positions=block_size, vocab_size=vocab), f)
cfg.distill.final.enabled = False
_, _, steps = compile_lib.distill_stage_steps(cfg, jax.devices())
print(f"teacher {cfg.distill.teacher}, student {layers} x {width}, T={block_size}, "
      f"batch {batch}, {jax.devices()[0].device_kind}")

def materialise(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.device_put(jax.random.key(0), x.sharding)
    return jax.jit(lambda: jnp.zeros(x.shape, x.dtype), out_shardings=x.sharding)()

for stage, step, args in steps:
    trainable, opt_state, frozen, teacher, data, rng = jax.tree.map(materialise, args)
    t0 = time.perf_counter()
    trainable, opt_state, m = step(trainable, opt_state, frozen, teacher, data, rng)
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    n = 10
    t0 = time.perf_counter()
    for _ in range(n):
        trainable, opt_state, m = step(trainable, opt_state, frozen, teacher, data, rng)
    jax.block_until_ready(m)
    seconds = (time.perf_counter() - t0) / n
    print(f"stage {stage.name}: step {seconds * 1e3:.1f} ms ({batch * block_size / seconds:.0f} "
          f"tok/s; compile + first step {first:.1f}s)")
EOF

note ""
note "total: $(( $(date +%s) - START ))s; logs and JSON in $OUT_DIR"
echo "summary: $SUMMARY" >&2
