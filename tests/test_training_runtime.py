"""The process around a training run: the reused heap that spares every step its page faults."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
import torch

from exporter.training_runtime import reused_heap

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Run in a fresh process: glibc's settings are per process and an earlier training in the test process (or its
# restored defaults, which no longer adapt the mmap threshold) would change what "default" means.
PROBE = """
import json, resource, torch
from exporter.training_runtime import reused_heap

BLOCK = 64 * 2**20 // 4  # 64 MiB of float32: above glibc's largest dynamic mmap threshold (32 MiB)

def step():  # a training step's allocation pattern in miniature: four blocks filled, then all freed
    blocks = [torch.ones(BLOCK) for _ in range(4)]
    del blocks

def faults_of_a_step():
    step(); step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults_of_a_step()
with reused_heap(torch.device("cpu")) as applied:
    faults_of_a_step()  # the heap grows to the step's size once
    reused = faults_of_a_step()
print(json.dumps({"default": default, "reused": reused, "applied": applied,
                  "pages": 4 * BLOCK * 4 // resource.getpagesize()}))
"""


@pytest.mark.skipif(not GLIBC, reason="the reused heap is glibc's mallopt; this platform's allocator is left alone")
def test_reused_heap_spares_every_step_its_page_faults() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True).stdout
    measured = json.loads(out.strip().splitlines()[-1])
    assert measured["applied"]
    assert measured["default"] > measured["pages"] // 2, measured  # each block unmapped, then faulted in again
    assert measured["reused"] < measured["pages"] // 20, measured


def test_reused_heap_leaves_a_gpu_run_alone() -> None:
    with reused_heap(torch.device("cuda", 0)) as applied:
        assert not applied
