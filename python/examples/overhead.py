"""The cost of one small evaluation from Python: the same loop as the Rust example
`cargo run --release --example eval_overhead`; the difference is the Python layer's cost.

    python python/examples/overhead.py [n]
"""

import sys
import time

import numpy as np

import corvid

n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
g = corvid.Graph("overhead")
base = np.arange(16, dtype=np.float32).reshape(4, 4)
checksum = 0.0
t = time.perf_counter()
for i in range(n):
    x = g.tensor(base + i * 16)
    y = (x * 2.0).relu()
    checksum += float(y.eval()[0, 1])
per = (time.perf_counter() - t) / n
print(f"python: {per * 1e6:.1f} us per small eval ({n} evals, checksum {checksum})")
