"""NumPy/OpenBLAS f32 matmul GFLOP/s, the yardstick for the CPU backend's bench figures.

Run on the same machine as `cargo bench -p corvid-kernels`, one after the other:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 kernels/benches/numpy_matmul.py
"""
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

for n in (512, 1024, 2048, 4096):
    a = np.random.default_rng(1).uniform(-1, 1, (n, n)).astype(np.float32)
    b = np.random.default_rng(2).uniform(-1, 1, (n, n)).astype(np.float32)
    for threads in (1, 2):
        with threadpool_limits(threads):
            a @ b
            reps = max(3, int(2e10 / n**3))
            best = float("inf")
            for _ in range(reps):
                t = time.perf_counter()
                a @ b
                best = min(best, time.perf_counter() - t)
        print(f"numpy matmul {n:>4} {threads} thread(s): {2 * n**3 / best / 1e9:7.1f} GFLOP/s ({best * 1e3:.1f} ms)")
print([(i["internal_api"], i.get("architecture")) for i in threadpool_info()])
