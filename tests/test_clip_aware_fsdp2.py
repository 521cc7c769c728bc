"""ClipAwareAdamW under FSDP2 (``fully_shard``: DTensor parameter shards), 2 gloo ranks on CPU."""

from __future__ import annotations

import json
import os

import pytest
from dist_utils import launch_env, run_worker, torchrun

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.distributed
def test_fsdp2_shards_match_reference_and_skip_together(tmp_path):
    out = tmp_path / "fsdp2.json"
    cmd = torchrun(2) + [os.path.join(HERE, "dist", "fsdp2_clip_aware_worker.py"), str(out)]
    run_worker(cmd, launch_env(), out, os.path.dirname(HERE), timeout=300)
    r0, r1 = json.loads(out.read_text())
    for r in (r0, r1):
        assert r["world"] == 2 and r["is_dtensor"]
        assert r["max_diff"] <= 1e-6, r  # the sharded steps equal the full-model optimizer
        assert r["stats"][-1] == pytest.approx(r["ref_final"], rel=1e-12)
        assert r["moved_after_nan"] is False and r["skipped"] == 1  # NaN on rank 1's shard: both skip
        assert r["moved_after_huge"] is True  # 1e19 on rank 1's shard is finite: both step
    assert r0["stats"] == r1["stats"]  # identical kappa and alpha on both ranks
    assert r0["stats"][0][0] == pytest.approx(0.7) and r0["stats"][-1][1] < 1.0  # gate and controller active
