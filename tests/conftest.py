"""Test-suite settings: tiny models run fastest on one thread (no OpenMP hand-offs on a 2-core machine)."""

import torch


def pytest_configure(config):
    torch.set_num_threads(1)
