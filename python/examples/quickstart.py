"""RavOp's quickstart in Corvid: build a graph, evaluate it on a local swarm, verified.

    python python/examples/quickstart.py
"""

import numpy as np

import corvid

client = corvid.Client.local(2)          # embedded workers; Client.connect([addr]) joins a swarm
g = corvid.Graph("quickstart", client)   # RavOp: graph = R.Graph(name='test')
a = g.tensor(np.array([1, 2, 3], np.float32))   # a = R.t([1, 2, 3])
b = g.tensor(np.array([5, 22, 7], np.float32))
c = a + b                                # c = a + b
print("a + b =", c.eval())

w = g.random([3, 2], seed=7)
y = (a.reshape([1, 3]) @ w).softmax(1)
print("softmax(a @ w) =", y.eval())
print(client.last_summary())

# Several jobs at once: each is a concurrent.futures.Future.
jobs = [g.submit([(a * k).tanh()]) for k in range(1, 4)]
for job in corvid.as_completed(jobs):
    print("job done:", job.result()[0])
g.end()
