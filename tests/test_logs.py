"""What a run prints: the package's own logger at INFO, libraries at WARNING unless asked;
seconds as a person reads them."""
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


def test_duration():
    assert [logs.duration(s) for s in (8.24, 75, 4000)] == ["8.2 s", "1 min 15 s",
                                                              "1 h 07 min"]
