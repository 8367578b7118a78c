"""Batch prediction with map: a classifier's weights saved to .npz, loaded as a Model (named by
its content hash), and run over 1,000 inputs on a local swarm; every result verified, in input
order; the summed summary shows the weights crossed the network once per worker.

    python python/examples/batch_predict.py
"""

import os
import tempfile
import time

import numpy as np

import corvid

rng = np.random.default_rng(0)
weights = {
    "w1": (rng.standard_normal((64, 256)) / 8).astype(np.float32),
    "b1": np.zeros(256, np.float32),
    "w2": (rng.standard_normal((256, 10)) / 16).astype(np.float32),
    "b2": np.zeros(10, np.float32),
}
path = os.path.join(tempfile.mkdtemp(), "classifier.npz")
np.savez(path, **weights)
model = corvid.Model.load(path)
print(model)


def classify(x, w):
    return ((x @ w["w1"] + w["b1"]).relu() @ w["w2"] + w["b2"]).softmax(1)


comp = corvid.Computation(classify, model=model)
inputs = [rng.standard_normal((1, 64)).astype(np.float32) for _ in range(1000)]
client = corvid.Client.local(2)
t = time.perf_counter()
probs = client.map(comp, inputs, window=32)
secs = time.perf_counter() - t
print(f"{len(probs)} inputs in {secs:.2f} s; first classes: {[int(p.argmax()) for p in probs[:8]]}")
text, places = client.map_summary()
print(text)
