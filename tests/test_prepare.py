"""l2t_jax.prepare: the STL-10 binary files into npz arrays, in the files' order."""
import numpy as np
import pytest

from l2t_jax import data


def test_stl10_binary_keeps_the_file_order(tmp_path):
    """Images written in the official binary layout come back in file order, labels 0..9."""
    from l2t_jax import prepare
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(5)          # position markers
    labels = np.array([1, 10, 3, 3, 7], np.uint8)
    for split in ("train", "test"):
        images.transpose(0, 3, 2, 1).tofile(tmp_path / f"{split}_X.bin")
        labels.tofile(tmp_path / f"{split}_y.bin")
    prepare.main(["stl10", "--binary_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")])
    source = data.npz_source(str(tmp_path / "out"), "train")
    np.testing.assert_array_equal(source.images, images)
    assert source.labels.tolist() == [0, 9, 2, 2, 6]
    (tmp_path / "test_X.bin").write_bytes(b"\0" * 100)
    with pytest.raises(data.DataError, match="truncated"):
        prepare.read_stl10_binary(str(tmp_path), "test")
