"""Loss functions against PyTorch (resize) and small independent NumPy implementations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from l2t_jax.transfer import losses


@pytest.mark.parametrize("in_size,out_size", [(32, 16), (32, 8), (8, 32), (8, 2), (16, 4),
                                               (7, 14), (112, 7)])
def test_bilinear_resize_equals_torch_interpolate(in_size, out_size):
    rng = np.random.default_rng(in_size * 100 + out_size)
    x = rng.normal(size=(2, 3, in_size, in_size)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(x), scale_factor=out_size / in_size,
                             mode="bilinear", align_corners=False).numpy()
    ours = losses.bilinear_resize(jnp.asarray(x.transpose(0, 2, 3, 1)), (out_size, out_size))
    assert ours.shape == (2, out_size, out_size, 3)
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), expected, rtol=0,
                               atol=1e-6)


def test_resize_does_not_antialias():
    # jax.image.resize would average 4x4 blocks here; PyTorch reads 2 pixels of each 4.
    x = jnp.arange(32.0).reshape(1, 1, 32, 1) * jnp.ones((1, 32, 1, 1))
    resized = losses.bilinear_resize(x, (8, 8))
    np.testing.assert_allclose(resized[0, 0, :, 0], np.arange(8) * 4 + 1.5)
    assert not np.allclose(resized, jax.image.resize(x, (1, 8, 8, 1), "bilinear"))


def _numpy_distances(source, regressed):
    return ((regressed - source) ** 2).mean(axis=(1, 2))


def test_weighted_matching_loss_by_hand():
    rng = np.random.default_rng(0)
    source = [rng.normal(size=(3, 4, 4, 5)), rng.normal(size=(3, 2, 2, 6))]
    regressed = [rng.normal(size=(3, 4, 4, 5)), rng.normal(size=(3, 2, 2, 6))]
    channel_weights = [rng.dirichlet(np.ones(5), size=3), rng.dirichlet(np.ones(6), size=3)]
    pair_weights = [rng.uniform(0, 6, size=3), rng.uniform(0, 6, size=3)]
    beta = 0.5
    d = [_numpy_distances(s, r) for s, r in zip(source, regressed)]
    expected = {
        "both": sum(beta * np.mean(pw * (cw * di).sum(1))
                    for di, cw, pw in zip(d, channel_weights, pair_weights)),
        "what": sum(beta * np.mean((cw * di).sum(1)) for di, cw in zip(d, channel_weights)),
        "where": sum(beta * np.mean(pw * di.sum(1)) for di, pw in zip(d, pair_weights)),
        "none": sum(beta * di.mean() for di in d),
    }
    args = {"both": (channel_weights, pair_weights), "what": (channel_weights, None),
            "where": (None, pair_weights), "none": (None, None)}
    for name, (cw, pw) in args.items():
        value = losses.weighted_matching_loss(source, regressed, cw, pw, beta)
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, err_msg=name)


def test_matching_resizes_the_source_to_the_target():
    rng = np.random.default_rng(1)
    source = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    regressed = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    resized = F.interpolate(torch.from_numpy(source.transpose(0, 3, 1, 2)), scale_factor=0.5,
                            mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(losses.channel_distances(source, regressed),
                               _numpy_distances(resized, regressed), rtol=1e-5)


def test_attention_transfer_by_hand():
    rng = np.random.default_rng(2)
    source = rng.normal(size=(2, 4, 4, 3))
    target = rng.normal(size=(2, 4, 4, 7))

    def attention(x):
        a = (x ** 2).mean(-1).reshape(2, -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    expected = 0.7 * ((attention(target) - attention(source)) ** 2).mean()
    np.testing.assert_allclose(losses.attention_transfer_loss([source], [target], 0.7),
                               expected, rtol=1e-5)


def test_distillation_and_cross_entropy_by_hand():
    rng = np.random.default_rng(3)
    student, teacher = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    labels = np.array([0, 3, 4, 1])

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    expected = -np.mean(np.sum(softmax(teacher / 2) * np.log(softmax(student / 2)), 1))
    np.testing.assert_allclose(losses.distillation_loss(student, teacher, 2.0), expected,
                               rtol=1e-5)
    np.testing.assert_allclose(losses.cross_entropy(student, labels),
                               -np.mean(np.log(softmax(student)[np.arange(4), labels])),
                               rtol=1e-5)
    assert float(losses.accuracy(student, labels)) == np.mean(student.argmax(1) == labels)
