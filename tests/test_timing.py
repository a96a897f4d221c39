import json
import time

import torch

from adainfer import timing
from adainfer.timing import SPEED_FLAGS, machine, peak_memory


def test_peak_memory_sees_a_large_temporary():
    def allocate():
        # 64 MiB, alive for 50 ms: the sampler gets a turn on a loaded machine
        x = torch.ones(64 * 2**20 // 4)
        time.sleep(0.05)
        return float(x.sum())

    assert peak_memory(allocate, "cpu") > 32 * 2**20


def test_machine_records_the_cpu_and_keeps_the_old_keys():
    m = machine()
    for key in ("cores", "torch_threads", "cpu", "cuda", "torch"):  # read by older bench.json
        assert key in m
    assert "cpu_model" in m and "cpu_flags" in m
    if m["cpu_flags"] is not None:
        assert set(m["cpu_flags"]) == set(SPEED_FLAGS)
        assert all(isinstance(v, bool) for v in m["cpu_flags"].values())
    json.dumps(m)  # it goes into bench.json


def test_cpu_fields_are_read_from_cpuinfo_or_lscpu_text():
    cpuinfo = (
        "processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu avx2 avx512f amx_bf16\n\n"
        "processor\t: 1\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu\n"
    )
    fields = timing._fields(cpuinfo)
    assert fields["model name"] == "Some CPU @ 2.0GHz"
    assert fields["flags"].split() == ["fpu", "avx2", "avx512f", "amx_bf16"]  # the first core's
    lscpu = "Architecture:  x86_64\nModel name:    Other CPU\nFlags:         avx2\n"
    assert timing._fields(lscpu)["model name"] == "Other CPU"
