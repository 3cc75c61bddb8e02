"""The matmul convolution: it gives the native convolution's numbers on the real networks,
and its second-order gradient compiles on XLA:CPU without transposes. (The package's XLA
flags, which keep the CPU step deterministic: test_xla_workarounds.py.)
"""
import jax
import jax.numpy as jnp
import numpy as np

from helpers import normalized_images
from l2t_jax import models
from l2t_jax.models import convolution, torch_layout
from l2t_jax.training import converted


def test_second_order_matmul_convolution_compiles_without_transposes():
    """The meta-gradient differentiates through a gradient. XLA folds the transposes of
    reverse-mode differentiation into a dot only when its operands are rank 2; a rank-4
    patch product compiles this to 4 transposes (measured), and the L2T-ww step to 353
    more than the rank-2 product, 8-15% of its time (BENCHMARKS.md)."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 4)), jnp.float32)
    kernel = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 4, 8)), jnp.float32)

    def inner_loss(kernel, x):
        return jnp.sum(jnp.tanh(convolution.conv2d_matmul(x, kernel, 1, 1)) ** 2)

    def outer_loss(kernel, x):   # the loss after one differentiable SGD step, like the step's
        step = kernel - 0.1 * jax.grad(inner_loss)(kernel, x)
        return inner_loss(step, x)

    hlo = jax.jit(jax.grad(outer_loss)).lower(kernel, x).compile().as_text()
    assert hlo.count(" transpose(") == 0, [l for l in hlo.splitlines() if " transpose(" in l]


def test_matmul_convolution_equals_native(released_resnet32_path):
    """Both convolution implementations give the same numbers on the real networks."""
    state_dict, _ = converted.read_torch_checkpoint(released_resnet32_path)
    images = jnp.asarray(normalized_images(4, 32, seed=4))
    for name, classes, weights in [("resnet32", 200, state_dict), ("vgg9_bn", 100, None)]:
        native = models.get_model(name, classes, conv_impl="native")
        matmul = models.get_model(name, classes, conv_impl="matmul")
        variables = (torch_layout.flax_variables_from_torch(native, weights) if weights
                     else native.init(jax.random.key(0), images, train=False))
        out_native = native.apply(variables, images, train=False)
        out_matmul = matmul.apply(variables, images, train=False)
        for a, b in zip(jax.tree.leaves(out_native), jax.tree.leaves(out_matmul)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_depthwise_convolution_paths_agree_to_second_order():
    """The depthwise path (strided slices times kernel taps) against XLA's grouped
    convolution: outputs, gradients and a Hessian-vector product, with stride 2, padding 1
    and a channel multiplier of 2 (output channel o reads input channel o // 2, as torch's
    groups=C_in); and the Conv2d module picks each path by conv_impl."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 9, 9, 3)))
    kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 6)))
    with jax.enable_x64(True):
        x, kernel = jnp.asarray(x, jnp.float64), jnp.asarray(kernel, jnp.float64)

        def loss(conv, kernel, x):
            return jnp.sum(jnp.tanh(conv(x, kernel, 2, 1)) ** 2)
        native = lambda x, k, s, p: convolution.conv2d_native(x, k, s, p, groups=3)
        ours = convolution.conv2d_depthwise
        np.testing.assert_allclose(ours(x, kernel, 2, 1), native(x, kernel, 2, 1),
                                   rtol=1e-12, atol=1e-12)
        for argnum in (0, 1):       # d/dkernel, d/dx, and d/dkernel of d/dx . v
            g_ours = jax.grad(loss, argnums=argnum + 1)(ours, kernel, x)
            g_native = jax.grad(loss, argnums=argnum + 1)(native, kernel, x)
            np.testing.assert_allclose(g_ours, g_native, rtol=1e-10, atol=1e-12)
        hvp = lambda conv: jax.grad(lambda k: jnp.vdot(
            jax.grad(loss, argnums=2)(conv, k, x), jnp.ones_like(x)))(kernel)
        np.testing.assert_allclose(hvp(ours), hvp(native), rtol=1e-10, atol=1e-12)

    calls = []
    for impl, expected in (("matmul", "conv2d_depthwise"), ("native", "conv2d_native")):
        layer = convolution.Conv2d(features=6, kernel_size=3, padding=1, groups=3, impl=impl)
        variables = layer.init(jax.random.key(0), x.astype(jnp.float32))
        assert variables["params"]["kernel"].shape == (3, 3, 1, 6)
        jaxpr = str(jax.make_jaxpr(layer.apply)(variables, x.astype(jnp.float32)))
        calls.append(("conv_general_dilated" in jaxpr) == (expected == "conv2d_native"))
    assert all(calls)
