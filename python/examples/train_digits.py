"""Trains an MLP classifier on scikit-learn's digits across a swarm: every step (forward,
backward, Adam update) is one verified job, the batch split in two gradient branches that run
on different workers and are summed in a fixed order.

    python python/examples/train_digits.py                # 2 embedded workers
    python python/examples/train_digits.py /ip4/...       # a real swarm (its bootstrap address)
"""

import sys
import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import corvid


def data(seed: int = 0):
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[digits.target]
    return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=digits.target)


def init(seed: int = 0, hidden: int = 64) -> corvid.Model:
    rng = np.random.default_rng(seed)

    def glorot(n_in, n_out):
        limit = np.sqrt(6.0 / (n_in + n_out))
        return rng.uniform(-limit, limit, (n_in, n_out)).astype(np.float32)

    return corvid.Model(
        "mlp",
        {
            "w1": glorot(64, hidden),
            "b1": np.zeros((1, hidden), np.float32),
            "w2": glorot(hidden, 10),
            "b2": np.zeros((1, 10), np.float32),
        },
    )


def cross_entropy(x, y, w):
    """Mean softmax cross-entropy of the MLP over the rows it is given."""
    h = (x @ w["w1"] + w["b1"]).relu()
    logp = (h @ w["w2"] + w["b2"]).log_softmax(1)
    rows = x.shape[0]
    return -(logp * y).sum([0, 1]) / float(rows)


def accuracy(model: corvid.Model, x: np.ndarray, y: np.ndarray) -> float:
    h = np.maximum(x @ model["w1"] + model["b1"], 0.0)
    logits = h @ model["w2"] + model["b2"]
    return float((logits.argmax(1) == y.argmax(1)).mean())


def train(client, epochs: int = 12, batch: int = 128, seed: int = 0, on_step=None, log=print):
    x_train, x_test, y_train, y_test = data(seed)
    trainer = corvid.Trainer(
        cross_entropy, init(seed), client, optimizer="adam", lr=0.01, shards=2
    )
    order = np.random.default_rng(seed)
    for epoch in range(epochs):
        started = time.perf_counter()
        perm = order.permutation(len(x_train))
        losses = []
        for i in range(0, len(perm), batch):
            rows = perm[i : i + batch]
            losses.append(trainer.step(x_train[rows], y_train[rows]))
            if on_step is not None:
                on_step(trainer.steps)
        log(
            f"epoch {epoch + 1:2}: loss {np.mean(losses):.4f}, "
            f"test accuracy {accuracy(trainer.model, x_test, y_test):.3f}, "
            f"{(time.perf_counter() - started) / len(losses) * 1e3:.0f} ms per step"
        )
    return trainer.model, accuracy(trainer.model, x_test, y_test)


def main():
    client = corvid.Client.connect(sys.argv[1], workers=2) if len(sys.argv) > 1 else corvid.Client.local(2)
    model, acc = train(client)
    print(f"final test accuracy {acc:.3f} (model {model.id[:12]})")
    print(client.last_summary())


if __name__ == "__main__":
    main()
