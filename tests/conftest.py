"""Suite-wide settings (one intra-op thread per test process) and shared fixtures.

`make test` runs pytest with two xdist workers on two cores; letting each worker spawn a thread per
core oversubscribes the machine and makes tiny-model tests many times slower.
"""

import pytest
import torch
from torch import nn

torch.set_num_threads(1)


@pytest.fixture
def single_thread():
    """One intra-op thread for the test, restored afterwards: tiny tensors gain nothing from
    threads, and on a busy 2-core machine oversubscription makes training loops ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def load_calls(monkeypatch):
    """The ``assign`` argument of every ``nn.Module.load_state_dict`` call (True: the checkpoint's
    tensors were taken, not copied into weights built beforehand)."""
    calls = []
    original = nn.Module.load_state_dict

    def spy(self, state_dict, strict=True, assign=False):
        calls.append(assign)
        return original(self, state_dict, strict=strict, assign=assign)

    monkeypatch.setattr(nn.Module, "load_state_dict", spy)
    return calls
