"""The process around a training run: the reused heap that spares every step its page faults."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from exporter.training_runtime import reused_heap

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
BLOCK = 64 * 2**20 // 4  # 64 MiB of float32: above glibc's largest dynamic mmap threshold (32 MiB)


def _step() -> None:
    """A training step's allocation pattern in miniature: four 64 MiB blocks filled, then all freed."""
    blocks = [torch.ones(BLOCK) for _ in range(4)]
    del blocks


def _faults_of_a_step() -> int:
    """Minor page faults of one step after two warm-up steps."""
    _step()
    _step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    _step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not GLIBC, reason="the reused heap is glibc's mallopt; this platform's allocator is left alone")
def test_reused_heap_spares_every_step_its_page_faults() -> None:
    pages = 4 * BLOCK * 4 // resource.getpagesize()
    assert _faults_of_a_step() > pages // 2  # glibc's default: each block is unmapped, then faulted in again
    with reused_heap(torch.device("cpu")) as applied:
        assert applied
        _faults_of_a_step()  # the heap grows to the step's size once
        assert _faults_of_a_step() < pages // 20


def test_reused_heap_leaves_a_gpu_run_alone() -> None:
    with reused_heap(torch.device("cuda", 0)) as applied:
        assert not applied
