"""[comm] and multi-node: a stalled rank ends the job within comm.train_timeout_seconds with one line, and two
torchrun agents joined by a c10d rendezvous (two "nodes" on this host) train exactly as one node of the same ranks."""

import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.distributed.launch import ROOT, rank_env, torchrun_job
from tests.distributed.layouts import layout_overrides

pytestmark = pytest.mark.distributed


@pytest.mark.slow
def test_a_stalled_rank_ends_the_job_within_the_timeout(tmp_path):
    timeout = 5
    ranks, overrides = layout_overrides("dp_shard=2", **{"training.steps": 6, "metrics.log_freq": 1,
                                                         "comm.train_timeout_seconds": timeout})
    start = time.monotonic()
    proc = torchrun_job(ranks, "train", tmp_path / "out.pt",
                        ["--stall-at-step", "2", "--stall-seconds", "300", *overrides], timeout=280)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: rank 0:")]
    assert len(lines) == 1, proc.stderr[-4000:]
    assert "timed out" in lines[0] and "comm.train_timeout_seconds" in lines[0], lines[0]
    assert "rank 1 did not report it: that rank died or hangs" in lines[0], lines[0]  # the stalled rank
    assert "Traceback" not in proc.stderr.split("error: rank 0:")[0], proc.stderr[-4000:]  # (torchrun's own follows)
    # Start-up and the first two steps take a few seconds; then rank 0 waits `timeout` s, not the 300 s stall.
    assert elapsed < 120, elapsed
    print(f"stalled rank: job ended after {elapsed:.1f} s (train timeout {timeout} s)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_match_one_node(runs, tmp_path):
    ranks, overrides = layout_overrides("dp_shard=4")
    endpoint = f"127.0.0.1:{_free_port()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint={endpoint}", "--rdzv-id=two-nodes", str(ROOT / "tests/distributed/worker.py"), "--job",
           "steps", str(tmp_path / "out.pt"), *overrides]
    nodes = [subprocess.Popen(cmd, env=rank_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"
    got, one_node = torch.load(tmp_path / "out.pt", weights_only=True), runs.steps("dp_shard=4")
    assert got["world_size"] == ranks
    assert got["losses"] == one_node["losses"] and got["grad_norms"] == one_node["grad_norms"]
    for name, value in one_node["params_after_step1"].items():
        assert torch.equal(got["params_after_step1"][name], value), name


def test_a_setup_error_on_some_ranks_is_raised_on_every_rank(pool, tmp_path):
    # a path that only some nodes see: every rank ends with the same line, none waits in a collective for them
    for failing, expected in (([2, 1], "on ranks 1, 2 only"), ([], None)):
        proc = pool.run(4, "agreed_errors", tmp_path / "out.pt", failing)
        assert proc.returncode == 0, proc.stderr[-3000:]
        raised = torch.load(tmp_path / "out.pt", weights_only=True)
        if expected is None:
            assert raised == [None] * 4
        else:
            assert raised == [f"training.dataset_path = '/data/1': no such file ({expected}: a path not every node "
                              f"sees?)"] * 4, raised
