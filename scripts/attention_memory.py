"""Per-device memory of one attention call's forward and backward on a TPU, compiled ahead of
time (needs libtpu, `pip install "jax[tpu]"`; no TPU):

    python scripts/attention_memory.py                       # B=8 H=12 T=1024 D=64 bf16, v5e
    python scripts/attention_memory.py --topology=v6e:2x2 --length=2048

The program is (q, k, v, g) -> the gradients of sum(attention(q, k, v) * g) with respect to
q, k and v (the forward and the backward), for every implementation that can run there:
Splash, jax.nn.dot_product_attention ('xla') and the materialised softmax ('xla_softmax').
It prints, per implementation, memory_analysis()'s argument, output and temporary bytes.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from cleangpt_jax import kernels

IMPLEMENTATIONS = ("splash", "xla", "xla_softmax")


def memory(name: str, shape, dtype, mesh) -> dict:
    """memory_analysis() of the forward and backward of implementation `name`."""
    attention = kernels.ATTENTION_KERNELS[name].fn

    def grads(q, k, v, g):
        loss = lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32) * g)  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    arg = jax.ShapeDtypeStruct(shape, dtype)
    with jax.set_mesh(mesh):
        stats = jax.jit(grads).trace(arg, arg, arg, arg).lower().compile().memory_analysis()
    return {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
            "temporaries": stats.temp_size_in_bytes}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    device = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices[0]
    mesh = jax.make_mesh((1,), ("data",), devices=[device])
    shape = (args.batch_size, args.length, args.n_head, args.head_dim)
    print(f"one device of {args.topology}, q k v (B, T, H, D) = {shape} {args.dtype}, "
          "forward + backward")
    print(f"{'implementation':<14}{'arguments MiB':>15}{'outputs MiB':>13}{'temporaries MiB':>17}")
    for name in IMPLEMENTATIONS:
        m = memory(name, shape, jnp.dtype(args.dtype), mesh)
        print(f"{name:<14}" + "".join(f"{m[key] / 2**20:>{width}.1f}" for key, width in
                                     (("arguments", 15), ("outputs", 13), ("temporaries", 17))))


if __name__ == "__main__":
    main()
