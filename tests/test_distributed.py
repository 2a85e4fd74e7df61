"""Distributed calibration on torch.distributed (gloo, 2 processes spawned by the test)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

import inc_bridge as ib

from .conftest import REPO
from .models import ToyNet, toy_batches

_RANK = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
import inc_bridge as ib
from tests.models import ToyNet, toy_batches
rank, out = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", rank=rank, world_size=2)
torch.manual_seed(0)
model = ToyNet()
data = [b * (1 + 2 * (i % 2)) for i, b in enumerate(toy_batches(n=6, seed=3))]
meas = ib.calibrate(model, data[rank::2])   # each rank calibrates its own shard only
meas.save(f"{{out}}/rank{{rank}}.json")
recipe = ib.Recipe.model_validate({{"quantization": {{"activation": {{"scale_method": "percentile", "percentile": 99.0}}}}}})
scales = ib.compute_scales(meas, recipe, model=model)
torch.save({{n: (ls.input_scale, ls.weight_scale) for n, ls in scales.layers.items()}}, f"{{out}}/scales{{rank}}.pt")
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_gloo_calibration_equals_single_process(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    script = _RANK.format(repo=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), str(tmp_path)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), outs[0][1][-3000:] + outs[1][1][-3000:]

    ranks = [ib.Measurements.load(tmp_path / f"rank{r}.json") for r in (0, 1)]
    torch.manual_seed(0)
    model = ToyNet()
    data = [b * (1 + 2 * (i % 2)) for i, b in enumerate(toy_batches(n=6, seed=3))]
    single = ib.calibrate(model, data)
    for meas in ranks:
        assert meas.ranks == (0, 1) and meas.num_batches == 6
        assert meas.names == single.names
        for name in single.names:
            assert meas[name].input_amax == single[name].input_amax, name  # maxabs: exactly equal
            assert meas[name].input_hist == single[name].input_hist, name  # histograms too
            assert meas[name].weight_amax_per_channel == single[name].weight_amax_per_channel
    s0, s1 = (torch.load(tmp_path / f"scales{r}.pt", weights_only=True) for r in (0, 1))
    assert s0.keys() == s1.keys()
    assert all(torch.equal(s0[n][0], s1[n][0]) and torch.equal(s0[n][1], s1[n][1]) for n in s0)
    # and a single rank's own shard would have given other statistics
    alone = ib.calibrate(model, data[0::2])
    assert any(alone[n].input_amax != single[n].input_amax for n in single.names)
