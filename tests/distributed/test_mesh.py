"""The DeviceMesh and its flattened views at 2, 4 and 8 ranks, checked against the rank arithmetic."""

import json

import pytest


pytestmark = pytest.mark.distributed

LAYOUTS = {  # name -> (ranks, dp_replicate, dp_shard)
    "dp_shard=2": (2, 1, 2),
    "dp_replicate=2": (2, 2, 1),
    "2x2 HSDP": (4, 2, 2),
    "dp_shard=8": (8, 1, 8),
    "2x4 HSDP": (8, 2, 4),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_mesh(name, pool, tmp_path):
    ranks, rep, shard = LAYOUTS[name]
    out = tmp_path / "mesh.json"
    proc = pool.run(ranks, "mesh", out, ["--parallelism.data_parallel_replicate_degree", str(rep),
                                         "--parallelism.data_parallel_shard_degree", str(shard)], timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    per_rank = json.loads(out.read_text())
    assert len(per_rank) == ranks
    for rank, rep_ in enumerate(per_rank):
        assert rep_["dp"]["shape"] == [ranks] and rep_["dp_cp"]["shape"] == [ranks]
        # 1-D without replicas: FSDP2 would run a 2-D mesh as HSDP even with a replicate dim of size 1.
        assert rep_["fsdp"]["shape"] == ([shard] if rep == 1 else [rep, shard])
        # mesh dims are row-major (pp, dp_replicate, dp_shard, cp, tp): with cp = tp = pp = 1 the fsdp mesh
        # is the rank grid (reshaped to (replicate, shard) for HSDP), and this rank's dp coordinate is its rank.
        assert rep_["fsdp"]["members"] == list(range(ranks))
        assert rep_["dp_coordinate"] == [rank, ranks]
        assert rep_["tp"]["members"] == [rank] and rep_["pp"]["members"] == [rank]
