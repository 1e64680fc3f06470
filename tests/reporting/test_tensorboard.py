"""Training curves as TensorBoard event files: what is logged is what the files hold."""

from compressor.reporting.tensorboard import ScalarWriter, read_scalars


def test_logged_scalars_are_in_the_event_files(tmp_path):
    writer = ScalarWriter(tmp_path / "tb")
    for step in (2, 4):
        writer.log({"step": step, "loss": 1.0 / step, "tau": 4.0}, step, "train")
    writer({"perplexity": 30.0, "tokens": 100}, 4, "eval")
    writer.close()
    scalars = read_scalars(tmp_path / "tb")
    assert scalars == {"train/loss": [(2, 0.5), (4, 0.25)], "train/tau": [(2, 4.0), (4, 4.0)],
                       "eval/perplexity": [(4, 30.0)], "eval/tokens": [(4, 100.0)]}


def test_a_writer_that_logs_nothing_writes_nothing(tmp_path):
    ScalarWriter(tmp_path / "tb").close()
    assert not (tmp_path / "tb").exists()
