"""What the GPU run starts with: the device, the software, and the copy bandwidth to hold kernels against.

    python experiments/gpu/device_check.py [--gib 4]

Prints JAX's devices and versions, then the measured device-to-device copy bandwidth (bytes read +
written / time, median of repeated copies of a --gib GiB array): the ceiling that paged decode is
judged against (experiments/gpu/run.sh). On CPU it copies a smaller array and says so.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp


def copy_bandwidth(num_bytes: int, reps: int = 10) -> float:
    """Median B/s of a device copy of num_bytes (counting the read and the write)."""
    x = jnp.ones(num_bytes // 2, jnp.bfloat16)
    copy = jax.jit(lambda a: a + jnp.bfloat16(0))  # one read and one write of every byte
    jax.block_until_ready(copy(x))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(copy(x))
        times.append(time.perf_counter() - t0)
    return 2 * num_bytes / statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=4.0, help="array size on a GPU (GiB); 1/16 of it on a CPU")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    print(f"python {platform.python_version()}, jax {jax.__version__}, backend {jax.default_backend()}, "
          f"devices: {[f'{d.device_kind} ({d.platform})' for d in jax.devices()]}")
    size = int(args.gib * (1 if on_gpu else 1 / 16) * 2**30)
    bw = copy_bandwidth(size)
    print(f"copy bandwidth: {bw / 1e9:.0f} GB/s (read + write of {size / 2**30:.2f} GiB, median of 10)"
          + ("" if on_gpu else " -- CPU, for the dry run only"))


if __name__ == "__main__":
    main()
