"""trainer/event_file.py writes event files that TensorBoard reads as SummaryWriter's scalars."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tensorboard_masked_crc32c

from trainer.event_file import ScalarEventWriter, crc32c, masked_crc32c


def test_crc32c_is_castagnoli():
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    for data in (b"", b"\x00" * 8, bytes(range(256)), b"loss_metrics/global_avg_loss"):
        assert masked_crc32c(data) == tensorboard_masked_crc32c(data)


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir))  # reads every record, checking both CRCs of each
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_reads_what_it_writes_as_summary_writer_wrote_it(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    logged = [({"loss": 8.09, "lr": 8e-4}, 1), ({"loss": 7.5, "lr": 4e-4, "mfu(%)": 3.9}, 2)]
    ours = ScalarEventWriter(tmp_path / "ours")
    theirs = SummaryWriter(log_dir=str(tmp_path / "theirs"))
    for values, step in logged:
        ours.add_scalars(values, step)
        for tag, value in values.items():
            theirs.add_scalar(tag, value, step)
    ours.close()
    theirs.close()
    ours = scalars(tmp_path / "ours")
    assert ours == scalars(tmp_path / "theirs")
    assert [(step, round(value, 5)) for step, value in ours["loss"]] == [(1, 8.09), (2, 7.5)]  # float32 values
