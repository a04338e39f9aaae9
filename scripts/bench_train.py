"""Training-step speed of the library's real train step: tokens/s, step time, MFU, peak memory;
with --vs-hf, Hugging Face's PyTorch GPT2LMHeadModel timed side by side in the same run.

    python scripts/bench_train.py --vs-hf                          # char and gpt2vocab on CPU
    python scripts/bench_train.py --vs-hf --threads 1              # both on one thread
    python scripts/bench_train.py --preset gpt2_124m --peak_tflops 989   # H100 bf16 dense peak
    python scripts/bench_train.py --preset gpt2_124m --peak_tflops 989 --attention xla \
        --json out.json                      # one attention implementation; results as JSON

Presets (GPT-2 flavoured Vanilla: bias, tanh-GELU, tied head, dropout 0, so HF runs the same
model):
  char       6 layers, 384 wide, 6 heads, block 256, batch 8, 65-symbol vocabulary, float32
  gpt2vocab  the same with GPT-2's 50257-token vocabulary
  gpt2_124m  GPT-2 124M: 12 layers, 768 wide, 12 heads, block 1024, batch 16, bfloat16 compute
Flags after --preset override its values (--n_layer, --batch, --dtype, ...); --attention sets
model.attention ('auto' or a name in kernels.ATTENTION_KERNELS, e.g. 'xla').

What is timed. Ours: `train_step.make_train_step` (jit, donated state, AdamW with clipping and
the weight-decay mask from `optim.make_optimizer`, the registered 'lm' strategy), on one batch
already on the device. HF: model(ids, labels=ids).loss.backward(), clip_grad_norm_, AdamW step
(decay on >= 2-D weights, as ours), zero_grad, same threads and precision (bf16: autocast).
Each repeat runs --steps steps and waits for the result; ours and HF alternate repeat by
repeat (the machine may be shared) and the medians are reported, with the process CPU time
per step (on a loaded machine --threads 1 compares the two most fairly: torch's OpenMP
threads lose the most when cores are oversubscribed). Compile is the AOT compile of the step,
reported apart.

MFU = tokens/s * (6 N + 12 L H Q T) / peak, N = parameters without the position embeddings
(nanoGPT / PaLM appendix B), against --peak_tflops or, when that is not given, a measured
matmul peak (best of several (n x n) @ (n x n) in the compute dtype on this backend).
Peak memory: device memory_stats()['peak_bytes_in_use'] where the backend has it; on CPU the
process's peak RSS so far, measured before the HF model is built (cases run in the order
given, so a later case's figure is at least an earlier one's), plus XLA's own buffer
accounting of the compiled step (arguments + temporaries).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cleangpt_jax import sharding, train_step  # noqa: E402
from cleangpt_jax.config import get_config, model_config  # noqa: E402
from cleangpt_jax.models import get_model  # noqa: E402
from cleangpt_jax.optim import make_optimizer  # noqa: E402

PRESETS = {
    "char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, batch=8,
                 dtype="float32"),
    "gpt2vocab": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=50257,
                      batch=8, dtype="float32"),
    "gpt2_124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257,
                      batch=16, dtype="bfloat16"),
}
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch", "dtype")
SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


# ----------------------------------------------------------------------------- ours
def build_ours(case: dict, seed: int = 0):
    """(compiled step, state, batch, n_params, compile seconds, XLA bytes) for `case`."""
    cfg = get_config()
    m = cfg.model
    m.update(model_type="vanilla", bias=True, activation="gelu_tanh", dropout=0.0,
             tie_embeddings=True, dtype=case["dtype"], param_dtype="float32",
             attention=case.get("attention", "auto"),
             **{k: case[k] for k in ("n_layer", "n_head", "n_embd", "block_size",
                                     "vocab_size")})
    t = cfg.train
    t.batch_size = case["batch"]
    t.num_steps = 10_000
    t.warmup_steps = 100
    mcfg = model_config(m)
    model = get_model(config=mcfg)
    mesh = sharding.create_mesh(1)
    optimizer, _ = make_optimizer(t, t.num_steps)
    loss_terms = train_step.get_strategy("lm", model, cfg)
    init = train_step.model_init_fn(model)
    state, shardings = train_step.create_train_state(init, optimizer, mesh, seed=seed)
    step = train_step.make_train_step(loss_terms, optimizer, mesh=mesh,
                                      state_shardings=shardings)
    ids = np.random.default_rng(seed).integers(0, case["vocab_size"],
                                               (case["batch"], case["block_size"]), np.int32)
    batch = sharding.global_batch({"input_ids": ids}, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    xla_bytes = None
    try:
        mem = compiled.memory_analysis()
        xla_bytes = mem.argument_size_in_bytes + mem.temp_size_in_bytes
    except Exception:  # noqa: BLE001 (not every backend reports it)
        pass
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    n_params -= state.params["wpe"]["embedding"].size
    return compiled, state, batch, n_params, compile_s, xla_bytes


class Ours:
    def __init__(self, case):
        (self.step, self.state, self.batch, self.n_params, self.compile_s,
         self.xla_bytes) = build_ours(case)

    def run(self, steps: int) -> float:
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch)
        return float(metrics["loss"])


# ------------------------------------------------------------------------------- HF
class HF:
    """GPT2LMHeadModel + torch AdamW, one training step per `run` iteration."""

    def __init__(self, case, threads: int):
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        import transformers

        transformers.logging.set_verbosity_error()
        torch.manual_seed(0)
        torch.set_num_threads(threads)
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        hf_cfg = GPT2Config(vocab_size=case["vocab_size"], n_positions=case["block_size"],
                            n_embd=case["n_embd"], n_layer=case["n_layer"],
                            n_head=case["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, activation_function="gelu_new",
                            bos_token_id=0, eos_token_id=0)
        self.model = GPT2LMHeadModel(hf_cfg).to(self.device).train()
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        other = [p for p in self.model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                      {"params": other, "weight_decay": 0.0}],
                                     lr=1e-4, betas=(0.9, 0.99), eps=1e-8)
        rng = np.random.default_rng(0)
        self.ids = torch.as_tensor(rng.integers(0, case["vocab_size"],
                                                (case["batch"], case["block_size"])),
                                   dtype=torch.long, device=self.device)
        self.bf16 = case["dtype"] == "bfloat16"

    def run(self, steps: int) -> float:
        torch = self.torch
        for _ in range(steps):
            with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.model(self.ids, labels=self.ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())


# ---------------------------------------------------------------------------- measures
def flops_per_token(n_params: int, case: dict) -> float:
    """6 N + 12 L H Q T (forward + backward; Q = head dim, T = sequence length)."""
    q = case["n_embd"] // case["n_head"]
    return 6 * n_params + 12 * case["n_layer"] * case["n_head"] * q * case["block_size"]


def matmul_peak_flops(dtype: str, repeats: int = 10) -> float:
    """Best observed FLOP/s of an (n x n) @ (n x n) matmul in `dtype` on the default backend
    (n = 2048 on CPU, 8192 on accelerators)."""
    n = 2048 if jax.default_backend() == "cpu" else 8192
    dt = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.key(0), (n, n), dt)
    b = jax.random.normal(jax.random.key(1), (n, n), dt)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def peak_memory() -> tuple[str, float]:
    """('device' | 'host RSS', GiB so far)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return "device", stats["peak_bytes_in_use"] / 2 ** 30
    # ru_maxrss is KiB on Linux.
    return "host RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def timed(fn, steps: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn(steps)
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


# ------------------------------------------------------------------------------- main
def bench_case(name: str, case: dict, args, peak: float, peak_label: str) -> dict:
    tokens = case["batch"] * case["block_size"]
    ours = Ours(case)
    ours.run(args.warmup)
    mem_kind, mem_gib = peak_memory()
    hf = HF(case, args.threads) if args.vs_hf else None
    if hf is not None:
        hf.run(args.warmup)
    ours_t, hf_t, ours_cpu, hf_cpu = [], [], [], []
    for _ in range(args.repeats):  # alternate, so both see the same machine load
        wall, cpu = timed(ours.run, args.steps)
        ours_t.append(wall), ours_cpu.append(cpu)
        if hf is not None:
            wall, cpu = timed(hf.run, args.steps)
            hf_t.append(wall), hf_cpu.append(cpu)
    fpt = flops_per_token(ours.n_params, case)
    o = statistics.median(ours_t)
    res = dict(case=name, ours_tps=tokens / o, ours_step=o, compile_s=ours.compile_s,
               mfu=tokens / o * fpt / peak, mem_kind=mem_kind, mem_gib=mem_gib,
               xla_gib=None if ours.xla_bytes is None else ours.xla_bytes / 2 ** 30,
               ours_spread=(tokens / max(ours_t), tokens / min(ours_t)))
    if hf is not None:
        h = statistics.median(hf_t)
        res.update(hf_tps=tokens / h, hf_step=h, ratio=h / o,
                   ratios=sorted(h_ / o_ for h_, o_ in zip(hf_t, ours_t)))
    print(f"{name}: {case} | N={ours.n_params / 1e6:.2f}M non-embedding-position params, "
          f"{fpt / 1e6:.1f} MFLOP/token", flush=True)
    print(f"  ours  {res['ours_tps']:9.0f} tok/s  step {o * 1e3:8.1f} ms  compile "
          f"{ours.compile_s:5.1f} s  MFU {100 * res['mfu']:5.1f}% of {peak_label}  "
          f"peak {mem_kind} {mem_gib:.2f} GiB"
          + ("" if res["xla_gib"] is None else f"  (XLA step buffers {res['xla_gib']:.2f} GiB)")
          + f"  [{res['ours_spread'][0]:.0f}..{res['ours_spread'][1]:.0f}]  "
          f"CPU {statistics.median(ours_cpu):.2f} s/step", flush=True)
    if hf is not None:
        print(f"  HF    {res['hf_tps']:9.0f} tok/s  step {h * 1e3:8.1f} ms   ratio ours/HF "
              f"{res['ratio']:.2f}x  (per repeat {', '.join(f'{r:.2f}' for r in res['ratios'])})"
              f"  CPU {statistics.median(hf_cpu):.2f} s/step", flush=True)
    del ours, hf
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="char,gpt2vocab",
                    help=f"comma-separated cases from {sorted(PRESETS)}")
    for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch"):
        ap.add_argument(f"--{key}", type=int, default=None)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    ap.add_argument("--attention", default="auto",
                    help="model.attention: 'auto' or an implementation of "
                         "kernels.ATTENTION_KERNELS")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    ap.add_argument("--vs-hf", dest="vs_hf", action="store_true",
                    help="also time HF PyTorch GPT2LMHeadModel and print ours/HF")
    ap.add_argument("--peak_tflops", type=float, default=None,
                    help="hardware peak for MFU (e.g. 989 for H100 SXM bf16 dense); "
                         "default: a measured matmul peak")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="CPU threads for both: torch intra-op threads; XLA uses every core, "
                         "or one with --threads 1 (set through XLA_FLAGS before JAX starts)")
    args = ap.parse_args()
    if args.threads == 1:  # appended: a user's own XLA_FLAGS stay
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                                   + SINGLE_THREAD_XLA_FLAGS).strip()
    elif args.threads != os.cpu_count():
        sys.exit(f"error: --threads must be 1 or {os.cpu_count()} (all cores): XLA's CPU "
                 f"thread pool cannot be sized in between")

    names = [n.strip() for n in args.preset.split(",") if n.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        sys.exit(f"error: unknown preset {unknown[0]!r}: choose from {sorted(PRESETS)}")
    cases = []
    for n in names:
        case = dict(PRESETS[n])
        case.update({k: getattr(args, k) for k in SHAPE_KEYS if getattr(args, k) is not None})
        case["attention"] = args.attention
        cases.append((n, case))

    backend = jax.default_backend()
    print("command: python " + " ".join(sys.argv))
    print(f"jax {jax.__version__} on {backend} ({jax.devices()[0].device_kind}, "
          f"{jax.device_count()} device(s)); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
          flush=True)
    results = []
    for name, case in cases:
        if args.peak_tflops:
            peak, label = args.peak_tflops * 1e12, f"{args.peak_tflops:g} TFLOP/s given"
        else:
            peak = matmul_peak_flops(case["dtype"])
            label = f"{peak / 1e12:.3g} TFLOP/s measured {case['dtype']} matmul"
        results.append(bench_case(name, case, args, peak, label))

    print("\n| case | ours tok/s | HF tok/s | ours/HF | step ms | compile s | MFU | peak mem |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        hf = f"{r['hf_tps']:.0f}" if "hf_tps" in r else "-"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        print(f"| {r['case']} | {r['ours_tps']:.0f} | {hf} | {ratio} | {r['ours_step'] * 1e3:.1f}"
              f" | {r['compile_s']:.1f} | {100 * r['mfu']:.1f}% | {r['mem_gib']:.2f} GiB "
              f"{r['mem_kind']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "backend": backend,
                       "jax": jax.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
