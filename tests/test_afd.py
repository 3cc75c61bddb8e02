"""AFD (l2t_jax/transfer/afd.py) against a float64 PyTorch restatement of the authors'
module (tests/reference_afd.py: clovaai/attention-feature-distillation @ dd990d0b,
distill/AFD.py).

Both sides hold the same parameters (random values in the Flax variables' shapes, copied
into the torch module) and see the same random NHWC / NCHW features. One train-mode step
is compared: the loss, the attention (ours (B, T, S) against the authors' atts (B, S, T)
transposed), the gradient with respect to every parameter of the module and to every
target (student) feature map, and the updated BatchNorm running statistics; then one
eval-mode forward with those statistics (loss and attention).

Tolerance: for every compared array, max |ours - theirs| <= 1e-10 * max |theirs| (the
error relative to the array's own magnitude). Exception: gradients that are zero in exact
arithmetic hold only rounding noise (~1e-18) on both sides, so a relative error means
nothing there; for those both sides must be below 1e-12 times the largest parameter
gradient instead. They are every Linear bias (a train-mode BatchNorm follows and removes
it) and the bilinear BN's bias (it adds the same amount to all of a source tap's logits,
which the softmax over target taps cancels).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import reference_afd
from l2t_jax.transfer import afd

TOLERANCE = 1e-10

# (C, H, W) per tap. BRIEF: the lead's shapes (source sizes 8, 4, 2; two target taps at
# 2x2). ODD: bins that do not divide (9 -> 7, 5 -> 3, 7 -> 5), up-sampling by a
# non-integer factor (2 -> 7, 3 -> 5), and two source taps with the same spatial size but
# different channels (one shared resampling here, two identical samplers there).
CASES = {
    "brief": dict(source=((16, 8, 8), (32, 4, 4), (64, 2, 2)),
                  target=((8, 8, 8), (16, 4, 4), (16, 2, 2), (32, 2, 2)),
                  batch=4, qk_dim=afd.QK_DIM),
    "odd": dict(source=((12, 7, 7), (24, 3, 3), (30, 3, 3), (24, 5, 5)),
                target=((6, 9, 9), (10, 5, 5), (20, 2, 2)),
                batch=4, qk_dim=16),
}


@pytest.fixture(scope="module", autouse=True)
def float64():
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def _features(rng, shapes, batch):
    """NHWC float64 maps, post-ReLU-like (non-negative, some exact zeros) as the authors'
    tapped features are."""
    return tuple(np.maximum(rng.standard_normal((batch, h, w, c)), -0.5) + 0.5
                 for c, h, w in shapes)


def _nchw(x):
    return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))


def _random_variables(module, source, target, rng):
    """Variables shaped by the module's init (traced only: ``jax.eval_shape``; compiling the
    init's many random draws costs more than the whole comparison) and filled here with
    PyTorch's default distributions: kernels and biases U(+-1/sqrt(fan_in)), BN scale
    1 + 0.2 N(0, 1) and bias 0.2 N(0, 1) (away from 1 and 0 so that they matter),
    positional terms N(0, 2 / (rows + cols)), running mean 0 and var 1. The init itself is
    checked separately."""
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
                assert name in ("p_source", "p_target"), name
                out[name] = rng.standard_normal(shape) * np.sqrt(2.0 / sum(shape))
        return out

    return fill(dict(shapes["params"])), fill(dict(shapes["batch_stats"]))


def _flat(tree, prefix=()):
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, prefix + (key,)))
        return out
    return {"/".join(prefix): np.asarray(tree)}


def _analytically_zero(name):
    return name.endswith("linear/bias") or name == "bilinear/bn/bias"


def _compare(report, name, ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    abs_err = float(np.max(np.abs(ours - theirs)))
    scale = float(np.max(np.abs(theirs)))
    rel_err = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else np.inf)
    report.append((name, abs_err, rel_err, scale))
    assert rel_err <= TOLERANCE, f"{name}: max abs err {abs_err:.3e}, scale {scale:.3e}"


def _print(report, title):
    print(f"\n{title}: quantity, max abs err, max abs err / max |ref|, max |ref| "
          "((zero) rows: max |ours|, max |ref| / largest gradient, max |ref|)")
    for name, abs_err, rel_err, scale in report:
        print(f"  {name:40s} {abs_err:.2e} {rel_err:.2e} {scale:.2e}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_afd_matches_authors_module_float64(case):
    cfg = CASES[case]
    batch = cfg["batch"]
    rng = np.random.default_rng(1234)
    source = _features(rng, cfg["source"], batch)
    target = _features(rng, cfg["target"], batch)

    module = afd.AFD(source_shapes=cfg["source"], target_shapes=cfg["target"],
                     qk_dim=cfg["qk_dim"])
    params, stats = _random_variables(module, source, target, rng)

    torch.manual_seed(0)
    reference = reference_afd.AFDReference(
        s_shapes=[(batch, c, h, w) for c, h, w in cfg["target"]],
        t_shapes=[(batch, c, h, w) for c, h, w in cfg["source"]],
        qk_dim=cfg["qk_dim"]).double()
    reference_afd.load_flax_variables(reference, {"params": params, "batch_stats": stats})
    reference.train()
    g_s = [torch.tensor(_nchw(f), requires_grad=True) for f in target]
    g_t = [torch.tensor(_nchw(f)) for f in source]
    ref_loss, ref_atts = reference(g_s, g_t)
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
    _compare(report, "attention (B,T,S)", attention,
             np.swapaxes(ref_atts.detach().numpy(), 1, 2))
    np.testing.assert_allclose(np.sum(np.asarray(attention), axis=1), 1.0, atol=1e-12)

    ours_grads, ref_grads = _flat(grad_params), _flat(reference_afd.flax_tree(reference, True))
    assert sorted(ours_grads) == sorted(ref_grads) == sorted(_flat(params))
    grad_scale = max(float(np.max(np.abs(g))) for g in ref_grads.values())
    for name in sorted(ref_grads):
        if _analytically_zero(name):
            ours_max = float(np.max(np.abs(ours_grads[name])))
            theirs_max = float(np.max(np.abs(ref_grads[name])))
            report.append((f"d loss / d {name} (zero)", ours_max, theirs_max / grad_scale,
                           theirs_max))
            assert max(ours_max, theirs_max) <= 1e-12 * grad_scale, name
        else:
            _compare(report, f"d loss / d {name}", ours_grads[name], ref_grads[name])
    for n, (ours_g, ref_x) in enumerate(zip(grad_target, g_s)):
        _compare(report, f"d loss / d target[{n}]", ours_g,
                 np.transpose(ref_x.grad.numpy(), (0, 2, 3, 1)))

    ours_stats, ref_stats = _flat(new_stats), _flat(reference_afd.running_stats(reference))
    assert sorted(ours_stats) == sorted(ref_stats)
    for name in sorted(ref_stats):
        _compare(report, f"running {name}", ours_stats[name], ref_stats[name])

    # Eval mode: BN on the running statistics just updated (both sides).
    reference.eval()
    with torch.no_grad():
        ref_loss_eval, ref_atts_eval = reference(g_s, g_t)
    loss_eval, attention_eval = jax.jit(lambda v, s, t: module.apply(v, s, t, train=False))(
        {"params": params, "batch_stats": new_stats}, source, target)
    _compare(report, "eval loss", loss_eval, ref_loss_eval.numpy())
    _compare(report, "eval attention", attention_eval,
             np.swapaxes(ref_atts_eval.numpy(), 1, 2))
    _print(report, f"AFD {case}")


def test_afd_init_follows_pytorch_defaults():
    """Linear U(+-1/sqrt(fan_in)) kernels and biases, BN 1/0 and running 0/1, positional
    terms N(0, 2 / (rows + cols)) (loose moment check on the 3 x 128 / 4 x 128 arrays)."""
    cfg = CASES["brief"]
    rng = np.random.default_rng(0)
    source = _features(rng, cfg["source"], 4)
    target = _features(rng, cfg["target"], 4)
    module = afd.AFD(cfg["source"], cfg["target"])
    variables = jax.jit(lambda s, t: module.init(jax.random.PRNGKey(1), s, t, train=True))(
        source, target)
    flat = _flat(variables["params"])
    for name, value in flat.items():
        if name.endswith("linear/kernel"):
            bound = 1.0 / np.sqrt(value.shape[0])
            assert np.all(np.abs(value) <= bound) and np.max(np.abs(value)) > 0.9 * bound
        elif name.endswith("linear/bias"):
            fan_in = flat[name.replace("bias", "kernel")].shape[0]
            assert np.all(np.abs(value) <= 1.0 / np.sqrt(fan_in))
        elif name.endswith("bn/scale"):
            np.testing.assert_array_equal(value, 1.0)
        elif name.endswith("bn/bias"):
            np.testing.assert_array_equal(value, 0.0)
    for name, rows in (("p_source", 3), ("p_target", 4)):
        std = np.sqrt(2.0 / (rows + afd.QK_DIM))
        assert flat[name].shape == (rows, afd.QK_DIM)
        assert 0.8 * std < np.std(flat[name]) < 1.2 * std
        assert np.max(np.abs(flat[name])) > 2.3 * std      # untruncated (jax truncates at 2.27 std)
    for name, value in _flat(variables["batch_stats"]).items():
        np.testing.assert_array_equal(value, 0.0 if name.endswith("mean") else 1.0)
