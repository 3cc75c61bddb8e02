"""PyTorch restatement of the authors' AFD module, for tests/test_afd.py.

Restates ``distill/AFD.py`` of github.com/clovaai/attention-feature-distillation at commit
dd990d0bb3788b60a0b0f5d44956f54e06e314ac (classes ``AFD``, ``Attention``,
``LinearTransformTeacher``, ``LinearTransformStudent``, ``Sample``, ``nn_bn_relu``) and the
shape bookkeeping of its ``main.py:69-71`` / ``utils.unique_shape``. Written for this test
(not copied), operation for operation: the same modules, the same order of reductions, the
same softmax axis. Their naming is kept: teacher (t) = our source, student (s) = our target;
``g_t`` / ``g_s`` are lists of NCHW tensors. The guide/hint layer selection of ``AFD`` is
left out: the lists passed in are already the selected layers.

Nothing here is fetched at test time; importing it has no side effects.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def unique_shape(shapes):
    """``utils.unique_shape``: index of each shape among the distinct shapes (first
    occurrence order), and the distinct shapes."""
    index, unique = [], []
    for shape in shapes:
        if shape not in unique:
            unique.append(shape)
        index.append(unique.index(shape))
    return index, unique


class LinearBNReLU(nn.Module):
    """``nn_bn_relu``: Linear, BatchNorm1d, and ReLU unless ``relu=False``."""

    def __init__(self, nin, nout):
        super().__init__()
        self.linear = nn.Linear(nin, nout)
        self.bn = nn.BatchNorm1d(nout)

    def forward(self, x, relu=True):
        x = self.bn(self.linear(x))
        return F.relu(x) if relu else x


class Sample(nn.Module):
    """``Sample``: channel-mean of squares of every student map, adaptive-average-pooled
    to one teacher size, flattened, stacked over the student layers: (b, s, tH*tW)."""

    def __init__(self, t_shape):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d((t_shape[2], t_shape[3]))

    def forward(self, g_s, bs):
        return torch.stack([self.pool(f.pow(2).mean(1, keepdim=True)).view(bs, -1)
                            for f in g_s], dim=1)


class LinearTransformTeacher(nn.Module):
    def __init__(self, t_shapes, qk_dim):
        super().__init__()
        self.query_layer = nn.ModuleList([LinearBNReLU(s[1], qk_dim) for s in t_shapes])

    def forward(self, g_t):
        bs = g_t[0].size(0)
        channel_mean = [f.mean(3).mean(2) for f in g_t]
        spatial_mean = [f.pow(2).mean(1).view(bs, -1) for f in g_t]
        query = torch.stack([layer(x, relu=False)
                             for x, layer in zip(channel_mean, self.query_layer)], dim=1)
        value = [F.normalize(x, dim=1) for x in spatial_mean]
        return query, value


class LinearTransformStudent(nn.Module):
    def __init__(self, s_shapes, t_shapes, unique_t_shapes, qk_dim):
        super().__init__()
        self.t, self.s, self.qk_dim = len(t_shapes), len(s_shapes), qk_dim
        self.samplers = nn.ModuleList([Sample(s) for s in unique_t_shapes])
        self.key_layer = nn.ModuleList([LinearBNReLU(s[1], qk_dim) for s in s_shapes])
        self.bilinear = LinearBNReLU(qk_dim, qk_dim * self.t)

    def forward(self, g_s):
        bs = g_s[0].size(0)
        channel_mean = [f.mean(3).mean(2) for f in g_s]
        spatial_mean = [sampler(g_s, bs) for sampler in self.samplers]
        key = torch.stack([layer(x) for layer, x in zip(self.key_layer, channel_mean)],
                          dim=1).view(bs * self.s, -1)
        bilinear_key = self.bilinear(key, relu=False).view(bs, self.s, self.t, -1)
        value = [F.normalize(x, dim=2) for x in spatial_mean]
        return bilinear_key, value


class Attention(nn.Module):
    """``Attention``: forward returns (list of per-teacher-layer losses, atts b x t x s).

    The authors' ``forward`` returns only the loss list; ``atts`` is returned as well so
    that the test can compare it (a read-out, no change to the math)."""

    def __init__(self, s_shapes, t_shapes, qk_dim):
        super().__init__()
        self.qk_dim = qk_dim
        self.n_t, unique_t_shapes = unique_shape(t_shapes)
        self.linear_trans_s = LinearTransformStudent(s_shapes, t_shapes, unique_t_shapes,
                                                     qk_dim)
        self.linear_trans_t = LinearTransformTeacher(t_shapes, qk_dim)
        self.p_t = nn.Parameter(torch.empty(len(t_shapes), qk_dim))
        self.p_s = nn.Parameter(torch.empty(len(s_shapes), qk_dim))
        nn.init.xavier_normal_(self.p_t)
        nn.init.xavier_normal_(self.p_s)

    def forward(self, g_s, g_t):
        bilinear_key, h_hat_s_all = self.linear_trans_s(g_s)
        query, h_t_all = self.linear_trans_t(g_t)
        p_logit = torch.matmul(self.p_t, self.p_s.t())
        logit = (torch.einsum("bstq,btq->bts", bilinear_key, query) + p_logit) / np.sqrt(
            self.qk_dim)
        atts = F.softmax(logit, dim=2)   # b x t x s: over the student layers
        losses = []
        for i, (n, h_t) in enumerate(zip(self.n_t, h_t_all)):
            diff = (h_hat_s_all[n] - h_t.unsqueeze(1)).pow(2).mean(2)   # b x s
            losses.append(torch.mul(diff, atts[:, i]).sum(1).mean())
        return losses, atts


class AFDReference(nn.Module):
    """``AFD`` on already-selected layers: ``forward(g_s, g_t) -> (sum(loss), atts)``.

    Shapes are (N, C, H, W) as in the authors' ``args.s_shapes`` / ``t_shapes`` (N is
    ignored)."""

    def __init__(self, s_shapes, t_shapes, qk_dim=128):
        super().__init__()
        self.attention = Attention([tuple(s) for s in s_shapes],
                                   [tuple(t) for t in t_shapes], qk_dim)

    def forward(self, g_s, g_t):
        losses, atts = self.attention(g_s, g_t)
        return sum(losses), atts


def _linear_bn_from_flax(module: LinearBNReLU, params, stats):
    module.linear.weight.data = torch.tensor(np.array(params["linear"]["kernel"]).T)
    module.linear.bias.data = torch.tensor(np.array(params["linear"]["bias"]))
    module.bn.weight.data = torch.tensor(np.array(params["bn"]["scale"]))
    module.bn.bias.data = torch.tensor(np.array(params["bn"]["bias"]))
    module.bn.running_mean.data = torch.tensor(np.array(stats["bn"]["mean"]))
    module.bn.running_var.data = torch.tensor(np.array(stats["bn"]["var"]))


def load_flax_variables(reference: AFDReference, variables) -> None:
    """Copy l2t_jax.transfer.afd.AFD's variables (params, batch_stats) into the reference:
    Dense kernels (in, out) -> Linear weights (out, in); names as in afd.py's docstring."""
    params, stats = variables["params"], variables["batch_stats"]
    att = reference.attention
    for m, layer in enumerate(att.linear_trans_t.query_layer):
        _linear_bn_from_flax(layer, params[f"query_{m}"], stats[f"query_{m}"])
    for n, layer in enumerate(att.linear_trans_s.key_layer):
        _linear_bn_from_flax(layer, params[f"key_{n}"], stats[f"key_{n}"])
    _linear_bn_from_flax(att.linear_trans_s.bilinear, params["bilinear"], stats["bilinear"])
    att.p_t.data = torch.tensor(np.array(params["p_source"]))
    att.p_s.data = torch.tensor(np.array(params["p_target"]))


def _linear_bn_to_flax(module: LinearBNReLU, grad: bool):
    get = (lambda p: p.grad) if grad else (lambda p: p.data)
    return {"linear": {"kernel": get(module.linear.weight).numpy().T,
                       "bias": get(module.linear.bias).numpy()},
            "bn": {"scale": get(module.bn.weight).numpy(), "bias": get(module.bn.bias).numpy()}}


def flax_tree(reference: AFDReference, grad: bool = False) -> dict:
    """The reference's parameters (or their .grad) as a tree shaped like the Flax params."""
    att = reference.attention
    get = (lambda p: p.grad) if grad else (lambda p: p.data)
    tree = {f"query_{m}": _linear_bn_to_flax(layer, grad)
            for m, layer in enumerate(att.linear_trans_t.query_layer)}
    tree.update({f"key_{n}": _linear_bn_to_flax(layer, grad)
                 for n, layer in enumerate(att.linear_trans_s.key_layer)})
    tree["bilinear"] = _linear_bn_to_flax(att.linear_trans_s.bilinear, grad)
    tree["p_source"] = get(att.p_t).numpy()
    tree["p_target"] = get(att.p_s).numpy()
    return tree


def running_stats(reference: AFDReference) -> dict:
    """The reference's BN running statistics, shaped like the Flax batch_stats."""
    att = reference.attention

    def stats(module):
        return {"bn": {"mean": module.bn.running_mean.numpy(),
                       "var": module.bn.running_var.numpy()}}

    tree = {f"query_{m}": stats(layer)
            for m, layer in enumerate(att.linear_trans_t.query_layer)}
    tree.update({f"key_{n}": stats(layer)
                 for n, layer in enumerate(att.linear_trans_s.key_layer)})
    tree["bilinear"] = stats(att.linear_trans_s.bilinear)
    return tree


__all__ = ["AFDReference", "unique_shape", "load_flax_variables", "flax_tree",
           "running_stats"]
