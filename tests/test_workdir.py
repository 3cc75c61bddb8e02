"""The workdir's files: metrics.jsonl written and read back, result.json marks a run
finished, malformed files are named in the error."""
import json

import numpy as np
import pytest

from l2t_jax.training import workdir


def test_metric_log_round_trip_and_run_record(tmp_path):
    log = workdir.MetricLog(str(tmp_path))
    log.write_run(0, {"l2t_jax": "x"})
    log.write(1, {"train/ce": np.float32(0.5), "train/pair_weights": np.array([1.0, 2.0])})
    log.close()
    records = workdir.read_metrics(workdir.path(str(tmp_path), workdir.METRICS))
    assert records == [{"step": 0, "run": {"l2t_jax": "x"}},
                       {"step": 1, "train/ce": 0.5, "train/pair_weights/0": 1.0,
                        "train/pair_weights/1": 2.0}]


def test_unfinished_last_line_is_skipped_other_bad_lines_are_named(tmp_path, capsys):
    path = tmp_path / workdir.METRICS
    path.write_text('{"step": 1, "train/ce": 1.0}\n{"step": 2, "tr')
    assert [r["step"] for r in workdir.read_metrics(str(path))] == [1]
    assert "skipping the unfinished last line 2" in capsys.readouterr().err
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: malformed metrics line"):
        workdir.read_metrics(str(path))


def test_result_marks_a_finished_run(tmp_path):
    assert not workdir.is_finished(str(tmp_path))
    written = workdir.write_result(str(tmp_path), {"test_at_best_val": 90.0})
    assert workdir.is_finished(str(tmp_path))
    assert workdir.read_json(written) == {"test_at_best_val": 90.0}
    (tmp_path / workdir.CONFIG).write_text("{broken")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        workdir.read_config(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        workdir.read_json(str(tmp_path / "nothing.json"))
    workdir.write_transfer_weights(str(tmp_path), {"pairs": [[0, 1]]})
    assert json.loads((tmp_path / workdir.TRANSFER_WEIGHTS).read_text()) == {"pairs": [[0, 1]]}
