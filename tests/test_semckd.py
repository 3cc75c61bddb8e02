"""SemCKD (l2t_jax/transfer/semckd.py) against a float64 PyTorch restatement of the
authors' code (tests/reference_semckd.py: DefangChen/SemCKD @ ebe5db19, models/util.py
SelfA and distiller_zoo/SemCKD.py SemCKDLoss).

Both sides hold the same parameters (random values in the Flax variables' shapes, copied
into the torch module) and see the same random NHWC / NCHW features. One train-mode step is
compared: the loss, the attention (B, T, S) (the authors' layout already), the gradient
with respect to every parameter of the module and to every target (student) feature map,
and the regressors' updated BatchNorm running statistics; then one eval-mode forward with
those statistics (loss and attention).

Tolerance: for every compared array, max |ours - theirs| <= 1e-10 * max |theirs| (the
error relative to the array's own magnitude).

Batch sizes. The attention MLPs embed each example's row of the (B, B) Gram matrix into
B // factor dimensions and l2-normalise it. With the brief's batch of 4 and the authors'
factor 4 that is one dimension: the embedding is sign(x), the attention energies are +-1
and every MLP gradient is exactly zero, so the comparison would pass without testing the
MLPs. The cases therefore use batch 8 with factor 4 (2 dimensions) and batch 4 with
factor 2 (2 dimensions).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import reference_semckd
from l2t_jax.transfer import semckd

TOLERANCE = 1e-10

# (C, H, W) per tap. BRIEF: the lead's shapes: equal sizes, target larger than source
# (pooled down before its regressor) and source larger (pooled to the target's size).
# ODD: pooling bins that do not divide (target 9 -> 7 and 9 -> 5; source 7, 5, 3 -> 2).
CASES = {
    "brief": dict(source=((16, 8, 8), (32, 4, 4), (64, 2, 2)),
                  target=((8, 8, 8), (16, 4, 4), (16, 2, 2), (32, 2, 2)),
                  batch=8, factor=semckd.FACTOR),
    "odd": dict(source=((12, 7, 7), (24, 3, 3), (20, 5, 5)),
                target=((6, 9, 9), (20, 2, 2)),
                batch=4, factor=2),
}


@pytest.fixture(scope="module", autouse=True)
def float64():
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def _features(rng, shapes, batch):
    """NHWC float64 maps, post-ReLU-like (non-negative, some exact zeros) as the authors'
    tapped stage outputs are."""
    return tuple(np.maximum(rng.standard_normal((batch, h, w, c)), -0.5) + 0.5
                 for c, h, w in shapes)


def _nchw(x):
    return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))


def _random_variables(module, source, target, rng):
    """Variables shaped by the module's init (traced only: ``jax.eval_shape``; compiling the
    init's many random draws costs more than the whole comparison) and filled here with
    PyTorch's default distributions: kernels and biases U(+-1/sqrt(fan_in)), BN scale
    1 + 0.2 N(0, 1) and bias 0.2 N(0, 1) (away from 1 and 0 so that they matter),
    running mean 0 and var 1. The init itself is checked separately."""
    shapes = jax.eval_shape(lambda s, t: module.init(jax.random.PRNGKey(0), s, t, train=True),
                            source, target)

    def fill(tree, path=()):
        out = {}
        for name, leaf in tree.items():
            if isinstance(leaf, dict):
                out[name] = fill(leaf, path + (name,))
                continue
            shape = leaf.shape
            if name == "kernel":
                bound = 1.0 / np.sqrt(np.prod(shape[:-1]))
                out[name] = rng.uniform(-bound, bound, shape)
            elif name == "bias" and "kernel" in tree:
                bound = 1.0 / np.sqrt(np.prod(tree["kernel"].shape[:-1]))
                out[name] = rng.uniform(-bound, bound, shape)
            elif name == "scale":
                out[name] = 1.0 + 0.2 * rng.standard_normal(shape)
            elif name == "bias":
                out[name] = 0.2 * rng.standard_normal(shape)
            elif name == "mean":
                out[name] = np.zeros(shape)
            elif name == "var":
                out[name] = np.ones(shape)
            else:
                raise AssertionError(f"unexpected variable {'/'.join(path + (name,))}")
        return out

    return fill(dict(shapes["params"])), fill(dict(shapes["batch_stats"]))


def _flat(tree, prefix=()):
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, prefix + (key,)))
        return out
    return {"/".join(prefix): np.asarray(tree)}


def _compare(report, name, ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    abs_err = float(np.max(np.abs(ours - theirs)))
    scale = float(np.max(np.abs(theirs)))
    rel_err = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else np.inf)
    report.append((name, abs_err, rel_err, scale))
    assert rel_err <= TOLERANCE, f"{name}: max abs err {abs_err:.3e}, scale {scale:.3e}"


def _print(report, title):
    print(f"\n{title}: quantity, max abs err, max abs err / max |ref|, max |ref|")
    for name, abs_err, rel_err, scale in report:
        print(f"  {name:40s} {abs_err:.2e} {rel_err:.2e} {scale:.2e}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_semckd_matches_authors_module_float64(case):
    cfg = CASES[case]
    # their counts: students = our target taps, teachers = our source taps
    batch, num_s, num_t = cfg["batch"], len(cfg["target"]), len(cfg["source"])
    rng = np.random.default_rng(4321)
    source = _features(rng, cfg["source"], batch)
    target = _features(rng, cfg["target"], batch)

    module = semckd.SemCKD(source_shapes=cfg["source"], target_shapes=cfg["target"],
                           batch_size=batch, factor=cfg["factor"])
    params, stats = _random_variables(module, source, target, rng)

    # Their roles: student (s) = our target, teacher (t) = our source.
    reference = reference_semckd.SemCKDReference(
        s_n=[c for c, _, _ in cfg["target"]], t_n=[c for c, _, _ in cfg["source"]],
        batch_size=batch, factor=cfg["factor"]).double()
    reference_semckd.load_flax_variables(reference, {"params": params, "batch_stats": stats})
    reference.train()
    feat_s = [torch.tensor(_nchw(f), requires_grad=True) for f in target]
    feat_t = [torch.tensor(_nchw(f)) for f in source]
    ref_loss, ref_attention = reference(feat_s, feat_t)
    ref_loss.backward()

    def loss_fn(p, tgt):
        (loss, attention), updated = module.apply(
            {"params": p, "batch_stats": stats}, source, tgt, train=True,
            mutable=["batch_stats"])
        return loss, (attention, updated["batch_stats"])

    (loss, (attention, new_stats)), (grad_params, grad_target) = jax.jit(
        jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(params, target)
    assert loss.dtype == jnp.float64

    report = []
    _compare(report, "loss", loss, ref_loss.detach().numpy())
    _compare(report, "attention (B,T,S)", attention, ref_attention.detach().numpy())
    np.testing.assert_allclose(np.sum(np.asarray(attention), axis=2), 1.0, atol=1e-12)

    ours_grads = _flat(grad_params)
    ref_grads = _flat(reference_semckd.flax_tree(reference, num_s, num_t, grad=True))
    assert sorted(ours_grads) == sorted(ref_grads) == sorted(_flat(params))
    for name in sorted(ref_grads):
        _compare(report, f"d loss / d {name}", ours_grads[name], ref_grads[name])
    for n, (ours_g, ref_x) in enumerate(zip(grad_target, feat_s)):
        _compare(report, f"d loss / d target[{n}]", ours_g,
                 np.transpose(ref_x.grad.numpy(), (0, 2, 3, 1)))

    ours_stats = _flat(new_stats)
    ref_stats = _flat(reference_semckd.running_stats(reference, num_s, num_t))
    assert sorted(ours_stats) == sorted(ref_stats)
    for name in sorted(ref_stats):
        _compare(report, f"running {name}", ours_stats[name], ref_stats[name])

    # Eval mode: BN on the running statistics just updated (both sides).
    reference.eval()
    with torch.no_grad():
        ref_loss_eval, ref_attention_eval = reference(feat_s, feat_t)
    loss_eval, attention_eval = jax.jit(lambda v, s, t: module.apply(v, s, t, train=False))(
        {"params": params, "batch_stats": new_stats}, source, target)
    _compare(report, "eval loss", loss_eval, ref_loss_eval.numpy())
    _compare(report, "eval attention", attention_eval, ref_attention_eval.numpy())
    _print(report, f"SemCKD {case}")


def test_semckd_rejects_another_batch_size():
    """The MLPs' input width is the batch size: a call with another batch is an error
    (the authors skip the last, smaller batch of an epoch)."""
    cfg = CASES["brief"]
    rng = np.random.default_rng(0)
    module = semckd.SemCKD(cfg["source"], cfg["target"], batch_size=8)
    with pytest.raises(ValueError, match="batch size"):
        module.init(jax.random.PRNGKey(0), _features(rng, cfg["source"], 6),
                    _features(rng, cfg["target"], 6), train=True)


def test_semckd_init_follows_pytorch_defaults():
    """Linear and conv kernels U(+-1/sqrt(fan_in)) (fan_in = C_in k k for the 3x3), Linear
    biases likewise, no conv biases, BN 1/0 and running 0/1. A small module: compiling the
    init's random draws is slow."""
    source_shapes, target_shapes = ((8, 4, 4), (6, 2, 2)), ((4, 4, 4),)
    rng = np.random.default_rng(0)
    source, target = _features(rng, source_shapes, 8), _features(rng, target_shapes, 8)
    module = semckd.SemCKD(source_shapes, target_shapes, batch_size=8)
    variables = jax.jit(lambda s, t: module.init(jax.random.PRNGKey(1), s, t, train=True))(
        source, target)
    flat = _flat(variables["params"])
    expected = {"query_0": 1, "key_0": 1, "key_1": 1, "regressor_0_0": 1, "regressor_0_1": 1}
    assert {name.split("/")[0] for name in flat} == set(expected)
    assert flat["query_0/linear1/kernel"].shape == (8, 4)     # batch -> 2 (batch // 4)
    assert flat["query_0/linear2/kernel"].shape == (4, 2)
    assert flat["regressor_0_1/conv2/kernel"].shape == (3, 3, 12, 12)
    assert not any(name.startswith("regressor") and name.endswith("conv1/bias") for name in flat)
    for name, value in flat.items():
        if name.endswith("kernel"):
            bound = 1.0 / np.sqrt(np.prod(value.shape[:-1]))
            assert np.all(np.abs(value) <= bound) and np.max(np.abs(value)) > 0.5 * bound, name
        elif "linear" in name and name.endswith("bias"):
            bound = 1.0 / np.sqrt(flat[name.replace("bias", "kernel")].shape[0])
            assert np.all(np.abs(value) <= bound), name
        elif name.endswith("scale"):
            np.testing.assert_array_equal(value, 1.0)
        else:
            np.testing.assert_array_equal(value, 0.0)
    for name, value in _flat(variables["batch_stats"]).items():
        np.testing.assert_array_equal(value, 0.0 if name.endswith("mean") else 1.0)
