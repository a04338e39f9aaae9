"""Time and host memory of `cleangpt_jax.hf.load_gpt2` against transformers' from_pretrained.

    python scripts/bench_hf_load.py                     # GPT-2 124M shape, random weights
    python scripts/bench_hf_load.py --n_layer=24 --n_embd=1024 --n_head=16   # gpt2-medium shape

Writes a random GPT2LMHeadModel with `save_pretrained` (the hub is not needed), then loads it in
fresh subprocesses: once with `load_gpt2` (float32 and bfloat16) and once with
`GPT2LMHeadModel.from_pretrained`. Memory is the peak resident set growth over the process's
size after imports, next to the checkpoint's size: anonymous memory (RssAnon, polled; ~1x the
file means no second full copy is held) and all resident memory (VmHWM, which also counts the
checkpoint's memory-mapped page-cache pages: reclaimable, not a copy).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap

MEASURE = textwrap.dedent("""
    import sys, threading, time
    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    which, directory = sys.argv[1], sys.argv[2]
    if which == "hf":
        import torch, transformers
        load = lambda: transformers.GPT2LMHeadModel.from_pretrained(directory)
    else:
        import jax
        from cleangpt_jax.hf import load_gpt2
        load = lambda: jax.block_until_ready(load_gpt2(directory, dtype=which)[1])
    peak, done = [0], threading.Event()
    def sample():  # the kernel keeps no high-water mark of anonymous memory: poll it
        while not done.is_set():
            peak[0] = max(peak[0], status("RssAnon"))
            time.sleep(0.001)
    base_anon, base_rss = status("RssAnon"), status("VmRSS")
    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    out = load()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    print(seconds, max(peak[0], status("RssAnon")) - base_anon, status("VmHWM") - base_rss)
""")

def measure(which: str, directory: str) -> tuple[float, int, int]:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", MEASURE, which, directory], env=env,
                          capture_output=True, text=True, check=True)
    seconds, anon, rss = proc.stdout.split()[-3:]
    return float(seconds), int(anon), int(rss)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--vocab_size", type=int, default=50257)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    import transformers

    config = transformers.GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                                     vocab_size=args.vocab_size)
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(config).save_pretrained(directory)
        size = os.path.getsize(os.path.join(directory, "model.safetensors"))
        print(f"GPT-2 L={args.n_layer} d={args.n_embd} V={args.vocab_size}: "
              f"model.safetensors {size / 2**20:.0f} MiB, best of {args.repeats} fresh processes")
        results = {}
        for which in ("hf", "float32", "bfloat16"):
            runs = [measure(which, directory) for _ in range(args.repeats)]
            results[which] = tuple(min(r[i] for r in runs) for i in range(3))
        mib = 2**20
        print(f"{'loader':<30}{'seconds':>8}{'peak anon':>12}{'x file':>7}{'peak RSS':>12}"
              f"{'x file':>7}")
        names = {"hf": "transformers from_pretrained", "float32": "load_gpt2(dtype='float32')",
                 "bfloat16": "load_gpt2(dtype='bfloat16')"}
        for which, (seconds, anon, rss) in results.items():
            print(f"{names[which]:<30}{seconds:>8.2f}{anon / mib:>8.0f} MiB{anon / size:>7.2f}"
                  f"{rss / mib:>8.0f} MiB{rss / size:>7.2f}")
        hf_seconds = results["hf"][0]
        print(f"load_gpt2 float32 speed vs transformers: {hf_seconds / results['float32'][0]:.2f}x")


if __name__ == "__main__":
    main()
