"""Suite-wide settings: one intra-op thread per test process.

`make test` runs pytest with two xdist workers on two cores; letting each worker spawn a thread per
core oversubscribes the machine and makes tiny-model tests many times slower.
"""

import torch

torch.set_num_threads(1)
