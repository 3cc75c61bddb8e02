"""What a run prints: the package's own logger at INFO, libraries at WARNING unless asked;
the grid progress line."""
import logging

from l2t_jax.training import logs


def test_configure_keeps_the_package_at_info_and_libraries_at_warning():
    root = logging.getLogger()
    before = root.level
    try:
        logs.configure()
        assert logging.getLogger("l2t_jax.training.train").getEffectiveLevel() == logging.INFO
        assert logging.getLogger("absl").getEffectiveLevel() == logging.WARNING
        logs.configure(log_libraries=True)
        assert logging.getLogger("absl").getEffectiveLevel() == logging.INFO
        root.setLevel(logging.DEBUG)
        logs.configure(keep_library_level=True)
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(before)


def test_duration_and_grid_progress(monkeypatch):
    assert [logs.duration(s) for s in (8.24, 75, 4000)] == ["8.2 s", "1 min 15 s",
                                                              "1 h 07 min"]
    clock = iter([0.0, 0.0, 60.0])
    monkeypatch.setattr(logs.time, "time", lambda: next(clock))
    progress = logs.GridProgress(4)
    assert progress.line(1, "scratch") == "run 1/4 (scratch) | elapsed 0.0 s"
    progress.finished(skipped=True)     # finished before: counts as done, takes no time
    progress.finished()
    assert progress.line(3, "fm") == "run 3/4 (fm) | elapsed 1 min 00 s, ETA 2 min 00 s"
