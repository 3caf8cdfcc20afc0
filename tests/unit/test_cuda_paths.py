"""Code that runs only on CUDA, run here on CPU with torch.cuda mocked: MFU peaks by GPU name and dtype, the RNG
state a checkpoint keeps, the device gloo trains on, the optimizer kernel, the memory check before a model is
materialized on a GPU, TF32 for fp32 matmuls, and batches pinned in host memory and copied without blocking
(CPU runs doing neither)."""

import random
import warnings
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from trainer import checkpoint_state, metrics
from trainer import train as train_module
from trainer import validate as validate_module
from trainer.build import build_model, plan_run
from trainer.config import ConfigError, load_config
from trainer.config.job_config import DataLoader
from trainer.data.dataloader import build_dataloader, to_device
from trainer.distributed import init_distributed
from trainer.metrics import MetricsLogger, peak_flops
from trainer.optim import build_optimizer, optimizer_kernel
from trainer.parallel_dims import device_type
from trainer.train import Trainer, enable_tf32

ROOT = Path(__file__).resolve().parents[2]
CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def gpu_named(monkeypatch):
    """Make torch.cuda report a GPU of the given name (and forget which unknown names were warned about)."""
    monkeypatch.setattr(metrics, "_warned", set())

    def named(name: str) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return named


@pytest.mark.parametrize("name,dtype,expected", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.5e12),
    ("NVIDIA H100 NVL", torch.float16, 835.5e12),
    ("NVIDIA H200", torch.bfloat16, 989.4e12),
    ("NVIDIA H20", torch.bfloat16, 148e12),  # a substring of "NVIDIA H200": matched H200's (and H100's) 989 before
    ("NVIDIA A10", torch.bfloat16, 125e12),  # a substring of "NVIDIA A100"
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
    ("NVIDIA L40", torch.bfloat16, 181e12),  # "L4" is a substring: it got L4's 121
    ("NVIDIA L40S", torch.bfloat16, 362e12),
    ("NVIDIA L4", torch.bfloat16, 121e12),
    ("NVIDIA B200", torch.bfloat16, 2.25e15),
    ("AMD Instinct MI300X", torch.bfloat16, 1307.4e12),
    ("NVIDIA H100 80GB HBM3", torch.float32, 66.9e12),  # fp32 matmuls without TF32 (torch's default)
    ("NVIDIA A100-SXM4-40GB", torch.float32, 19.5e12),
])
def test_gpu_peak_by_exact_name_and_dtype(gpu_named, name, dtype, expected):
    gpu_named(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert peak_flops(CUDA0, dtype, -1) == expected


def test_fp32_peak_counts_tf32_only_when_torch_uses_it(gpu_named):
    gpu_named("NVIDIA H100 80GB HBM3")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert peak_flops(CUDA0, torch.float32, -1) == 494.7e12
    finally:
        torch.set_float32_matmul_precision(before)


def test_unknown_gpu_gets_no_mfu_and_one_warning(gpu_named):
    gpu_named("NVIDIA Hypothetical X1")
    with pytest.warns(UserWarning, match="'NVIDIA Hypothetical X1'.*metrics.peak_flops"):
        assert peak_flops(CUDA0, torch.bfloat16, -1) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: silent
        assert peak_flops(CUDA0, torch.bfloat16, -1) is None
    assert peak_flops(CUDA0, torch.bfloat16, 5e14) == 5e14  # metrics.peak_flops still wins


@pytest.mark.parametrize("peak,shown", [(None, "mfu: n/a"), (1e6, "mfu: n/a"), (4e6, "mfu: 50.00%")],
                         ids=["no peak", "above 100%", "50%"])
def test_mfu_is_never_above_100_percent(monkeypatch, capsys, peak, shown):
    monkeypatch.setattr(metrics, "_warned", set())
    cfg = load_config(["--metrics.enable_tensorboard", "false", "--metrics.disable_color_printing"])
    logger = MetricsLogger(cfg, torch.device("cpu"), flops_per_token=1000, peak=peak, enabled=True,
                           tokens_divisor=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # 2,000 tokens in 1 s at 1,000 FLOPs each: 2 MFLOP/s achieved.
        scalars = logger.log(1, 2.0, 2.0, 1.0, 1e-3, tokens=2000, elapsed=1.0, data_time=0.0, steps=1)
    assert shown in capsys.readouterr().out
    assert scalars.get("mfu(%)") == (50.0 if peak == 4e6 else None)


class FakeGPUs:
    """torch.cuda's RNG functions on a machine showing `count` GPUs, with device `current` current."""

    def __init__(self, count: int, current: int):
        self.states = [torch.tensor([i], dtype=torch.uint8) for i in range(count)]
        self.current = current

    def _index(self, device) -> int:
        index = self.current if device in ("cuda", None) else torch.device(device).index
        if index >= len(self.states):
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        return index

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.states[self._index(device)])
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(self.states))

        def set_state(state, device="cuda"):
            self.states[self._index(device)] = state

        monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                            lambda states: [set_state(s, f"cuda:{i}") for i, s in enumerate(states)])


def test_rng_state_is_this_ranks_gpu_only(monkeypatch):
    # Saved by local rank 2 of a node that shows it 4 GPUs; resumed where each rank sees only its own GPU (e.g.
    # CUDA_VISIBLE_DEVICES per rank). Restoring every saved GPU by index failed there: device 1 does not exist.
    saver = FakeGPUs(count=4, current=2)
    saver.install(monkeypatch)
    saved = checkpoint_state._rng_state()
    assert torch.equal(saved["cuda"], torch.tensor([2], dtype=torch.uint8))
    resumer = FakeGPUs(count=1, current=0)
    resumer.install(monkeypatch)
    python_state = random.getstate()
    checkpoint_state._set_rng_state(saved)
    assert torch.equal(resumer.states[0], torch.tensor([2], dtype=torch.uint8))
    assert random.getstate() == python_state


@pytest.fixture
def gpus_visible(monkeypatch):
    """Eight GPUs visible to a single process (no torchrun variables); set_device records its device."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "COMM_BACKEND", "LOG_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    return current


def test_gloo_trains_on_cpu_where_gpus_are_visible(gpus_visible, monkeypatch, capsys):
    assert init_distributed().device == CUDA0 and device_type() == "cuda" and gpus_visible == [CUDA0]
    monkeypatch.setenv("COMM_BACKEND", "gloo")
    gpus_visible.clear()
    info = init_distributed()
    assert info.device == torch.device("cpu") and device_type() == "cpu" and gpus_visible == []
    out = capsys.readouterr().out
    assert "COMM_BACKEND = gloo: training on CPU although 8 GPU(s) are visible" in out and out.count("\n") == 1


def test_optimizer_kernel_is_fused_on_one_device_type_and_foreach_across_them():
    cpu = [torch.nn.Parameter(torch.zeros(2))]
    cuda = [SimpleNamespace(device=CUDA0, is_floating_point=lambda: True)] * 2
    assert optimizer_kernel("auto", cuda) == "fused"
    assert optimizer_kernel("auto", cpu) == "fused"
    assert optimizer_kernel("auto", cuda + cpu) == "foreach"  # one fused kernel cannot span two device types
    assert optimizer_kernel("for-loop", cuda) == "for-loop"
    cfg = load_config([])
    assert cfg.optimizer.implementation == "auto"
    assert build_optimizer(cpu, cfg.optimizer).defaults["fused"] is True


def test_model_that_cannot_fit_the_gpu_is_refused_before_materializing(monkeypatch):
    # llama3 8B on one 80 GiB GPU: 8.03e9 parameters x 16 bytes (fp32 weights, gradients, two AdamW moments).
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 2**30))
    cfg = load_config(["--model.flavor", "8B", "--training.seq_len", "64"])
    with pytest.raises(ConfigError) as e:
        build_model(plan_run(cfg, 1, "cuda"), CUDA0)  # on a CPU machine, any CUDA allocation would fail instead
    msg = str(e.value)
    assert "\n" not in msg and "need 119.7 GiB" in msg and "has 80.0 GiB" in msg, msg
    assert "parallelism.data_parallel_shard_degree" in msg and "parallelism.tensor_parallel_degree" in msg


def test_tf32_is_enabled_for_cuda_only(gpu_named):
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before, cpu_matmuls = (matmul.allow_tf32, cudnn.allow_tf32), torch.backends.mkldnn.matmul.fp32_precision
    try:
        enable_tf32(torch.device("cpu"))
        assert (matmul.allow_tf32, cudnn.allow_tf32) == before
        enable_tf32(CUDA0)
        assert (matmul.fp32_precision, cudnn.conv.fp32_precision) == ("tf32", "tf32")
        assert torch.backends.mkldnn.matmul.fp32_precision == cpu_matmuls  # CPU matmuls untouched
        # The MFU peak of an fp32 run reads the precision back (it raised when the newer API had set it): TF32's.
        gpu_named("NVIDIA H100 80GB HBM3")
        assert torch.get_float32_matmul_precision() == "high" and peak_flops(CUDA0, torch.float32, -1) == 494.7e12
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


def test_batches_copy_to_cuda_without_blocking_and_stay_put_on_cpu():
    inputs, labels = mock.MagicMock(), mock.MagicMock()
    to_device([inputs, labels], CUDA0)
    inputs.to.assert_called_once_with(CUDA0, non_blocking=True)
    labels.to.assert_called_once_with(CUDA0, non_blocking=True)
    batch = [torch.arange(4), torch.arange(4)]
    assert all(out is t for out, t in zip(to_device(batch, torch.device("cpu")), batch))


def test_pin_memory_defaults_to_the_device():
    def pinned(device_type: str, **options) -> bool:
        return build_dataloader("synthetic", None, None, 8, 2, 0, 1, vocab_size=64, options=DataLoader(**options),
                                device_type=device_type).pin_memory

    assert DataLoader().pin_memory is None
    assert (pinned("cuda"), pinned("cpu")) == (True, False)
    assert (pinned("cuda", pin_memory=False), pinned("cpu", pin_memory=True)) == (False, True)


def test_trainer_and_validation_copy_through_to_device(tmp_path, monkeypatch):
    # The Trainer's steps and the validation pass both move their batches with to_device; TF32 is asked for the
    # run's device at start-up.
    moved, tf32 = [], []
    real = to_device

    def spy(batch, device):
        moved.append(device)
        return real(batch, device)

    monkeypatch.setattr(train_module, "to_device", spy)
    monkeypatch.setattr(validate_module, "to_device", spy)
    monkeypatch.setattr(train_module, "enable_tf32", tf32.append)
    argv = ["--job.config_file", str(ROOT / "configs/debug_model.toml"), "--job.dump_folder", str(tmp_path),
            "--training.dataset", "synthetic", "--training.seq_len", "16", "--training.local_batch_size", "2",
            "--training.steps", "1", "--metrics.enable_tensorboard", "false", "--validation.enable",
            "--validation.dataset", "synthetic", "--validation.freq", "1", "--validation.steps", "1"]
    trainer = Trainer(load_config(argv))
    try:
        trainer.train()
        assert trainer.dataloader.pin_memory is False and trainer.validator.loader.pin_memory is False
    finally:
        trainer.close()
    assert tf32 == [torch.device("cpu")]
    assert moved == [torch.device("cpu")] * 2  # one training micro-batch, one validation batch


@pytest.mark.parametrize("backend,clean,expected", [("nccl", False, "abort"), ("nccl", True, "destroy"),
                                                    ("gloo", False, "destroy")])
def test_shutdown_after_an_error_aborts_nccl_instead_of_waiting(backend, clean, expected, monkeypatch):
    # destroy_process_group waits for NCCL collectives still pending (up to the 10-minute watchdog): after an
    # error, NCCL groups are aborted.
    import trainer.distributed as distributed

    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *a: backend)
    monkeypatch.setattr(distributed.dist, "barrier", lambda *a: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda *a: calls.append("destroy"))
    monkeypatch.setattr(distributed, "abort_process_groups", lambda: calls.append("abort"))

    def exit_(code):
        raise SystemExit(code)

    monkeypatch.setattr(distributed.os, "_exit", exit_)
    with pytest.raises(SystemExit):
        distributed.shutdown(1, clean=clean)
    assert calls[-1] == expected and ("barrier" in calls) == clean
