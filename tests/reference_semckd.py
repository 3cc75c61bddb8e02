"""PyTorch restatement of the authors' SemCKD, for tests/test_semckd.py.

Restates github.com/DefangChen/SemCKD at commit ebe5db190d87f3e493a5fdf04a808ef3179486dc:
``models/util.py`` (``SelfA``, ``MLPEmbed``, ``AAEmbed``, ``Normalize``) and
``distiller_zoo/SemCKD.py`` (``SemCKDLoss``), wired as ``helper/loops.py:135-136`` does:
``s_value, f_target, weight = SelfA(feat_s, feat_t); loss = SemCKDLoss(s_value, f_target,
weight)``. Written for this test (not copied), operation for operation, with their module
names (``query_weight{i}``, ``key_weight{j}``, ``regressor{i}{j}``) and their roles:
student (s) = our target, teacher (t) = our source; inputs are lists of NCHW tensors.

One change that does not touch the math: ``SemCKDLoss`` allocates its (bsz, s, t) buffer
with ``torch.zeros(...).cuda()`` (float32, on the GPU); here it is a float64 CPU buffer so
that float64 values are not rounded to float32 when written into it.

Nothing here is fetched at test time; importing it has no side effects.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Normalize(nn.Module):
    """x / (sum x^2)^(1/2) along dim 1, no epsilon."""

    def forward(self, x):
        return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))


class MLPEmbed(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.linear1 = nn.Linear(dim_in, 2 * dim_out)
        self.linear2 = nn.Linear(2 * dim_out, dim_out)
        self.l2norm = Normalize()

    def forward(self, x):
        x = x.view(x.shape[0], -1)
        return self.l2norm(self.linear2(F.relu(self.linear1(x))))


class AAEmbed(nn.Module):
    def __init__(self, num_input_channels, num_target_channels):
        super().__init__()
        mid = 2 * num_target_channels
        self.regressor = nn.Sequential(
            nn.Conv2d(num_input_channels, mid, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),   # theirs: inplace=True (same values and gradients)
            nn.Conv2d(mid, mid, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),   # theirs: inplace=True (same values and gradients)
            nn.Conv2d(mid, num_target_channels, kernel_size=1, bias=False),
        )

    def forward(self, x):
        return self.regressor(x)


class SelfA(nn.Module):
    """``SelfA(s_len, t_len, input_channel, s_n, s_t, factor)``: forward(feat_s, feat_t)
    -> (proj_value_stu[i][j], value_tea[i][j], attention (bsz, s_len, t_len))."""

    def __init__(self, s_len, t_len, input_channel, s_n, s_t, factor=4):
        super().__init__()
        for j in range(t_len):
            setattr(self, f"key_weight{j}", MLPEmbed(input_channel, input_channel // factor))
        for i in range(s_len):
            setattr(self, f"query_weight{i}",
                    MLPEmbed(input_channel, input_channel // factor))
        for i in range(s_len):
            for j in range(t_len):
                setattr(self, "regressor" + str(i) + str(j), AAEmbed(s_n[i], s_t[j]))

    def forward(self, feat_s, feat_t):
        bsz = feat_s[0].shape[0]
        sim_t = []
        for f in feat_t:
            flat = f.reshape(bsz, -1)
            sim_t.append(torch.matmul(flat, flat.t()))
        sim_s = []
        for f in feat_s:
            flat = f.reshape(bsz, -1)
            sim_s.append(torch.matmul(flat, flat.t()))

        # keys of the teacher layers stacked on dim 2, queries of the student layers on dim 1
        proj_key = torch.cat([getattr(self, f"key_weight{j}")(sim)[:, :, None]
                              for j, sim in enumerate(sim_t)], 2)            # bsz x d x t
        proj_query = torch.cat([getattr(self, f"query_weight{i}")(sim)[:, None, :]
                                for i, sim in enumerate(sim_s)], 1)          # bsz x s x d
        energy = torch.bmm(proj_query, proj_key)                              # bsz x s x t
        attention = F.softmax(energy, dim=-1)

        proj_value_stu, value_tea = [], []
        for i in range(len(sim_s)):
            proj_value_stu.append([])
            value_tea.append([])
            for j in range(len(sim_t)):
                s_H, t_H = feat_s[i].shape[2], feat_t[j].shape[2]
                regressor = getattr(self, "regressor" + str(i) + str(j))
                if s_H > t_H:
                    pooled = F.adaptive_avg_pool2d(feat_s[i], (t_H, t_H))
                    proj_value_stu[i].append(regressor(pooled))
                    value_tea[i].append(feat_t[j])
                else:   # s_H < t_H or s_H == t_H
                    value_tea[i].append(F.adaptive_avg_pool2d(feat_t[j], (s_H, s_H)))
                    proj_value_stu[i].append(regressor(feat_s[i]))
        return proj_value_stu, value_tea, attention


class SemCKDLoss(nn.Module):
    def forward(self, s_value, f_target, weight):
        bsz, num_stu, num_tea = weight.shape
        ind_loss = torch.zeros(bsz, num_stu, num_tea, dtype=weight.dtype)
        for i in range(num_stu):
            for j in range(num_tea):
                ind_loss[:, i, j] = F.mse_loss(s_value[i][j], f_target[i][j],
                                               reduction="none").reshape(bsz, -1).mean(-1)
        return (weight * ind_loss).sum() / (1.0 * bsz * num_stu)


class SemCKDReference(nn.Module):
    """SelfA + SemCKDLoss: forward(feat_s, feat_t) -> (loss, attention (bsz, s, t)).

    ``s_n`` / ``t_n``: channels per student / teacher layer; ``batch_size`` is SelfA's
    ``input_channel`` (train_student.py:271)."""

    def __init__(self, s_n, t_n, batch_size, factor=4):
        super().__init__()
        self.self_attention = SelfA(len(s_n), len(t_n), batch_size, s_n, t_n, factor)
        self.criterion = SemCKDLoss()

    def forward(self, feat_s, feat_t):
        s_value, f_target, weight = self.self_attention(feat_s, feat_t)
        return self.criterion(s_value, f_target, weight), weight


def _t(x):
    return torch.tensor(np.array(x))


def _mlp_from_flax(module: MLPEmbed, params):
    for name in ("linear1", "linear2"):
        layer = getattr(module, name)
        layer.weight.data = _t(params[name]["kernel"]).t().contiguous()
        layer.bias.data = _t(params[name]["bias"])


def _bn_from_flax(bn: nn.BatchNorm2d, params, stats):
    bn.weight.data, bn.bias.data = _t(params["scale"]), _t(params["bias"])
    bn.running_mean.data, bn.running_var.data = _t(stats["mean"]), _t(stats["var"])


def _regressor_from_flax(module: AAEmbed, params, stats):
    seq = module.regressor
    seq[0].weight.data = _t(params["conv1"]["kernel"]).t()[:, :, None, None].contiguous()
    _bn_from_flax(seq[1], params["bn1"], stats["bn1"])
    seq[3].weight.data = _t(params["conv2"]["kernel"]).permute(3, 2, 0, 1).contiguous()
    _bn_from_flax(seq[4], params["bn2"], stats["bn2"])
    seq[6].weight.data = _t(params["conv3"]["kernel"]).t()[:, :, None, None].contiguous()


def load_flax_variables(reference: SemCKDReference, variables) -> None:
    """Copy l2t_jax.transfer.semckd.SemCKD's variables into the reference (names and
    layouts as in semckd.py's docstring)."""
    params, stats = variables["params"], variables["batch_stats"]
    att = reference.self_attention
    num_s = sum(1 for k in params if k.startswith("query_"))
    num_t = sum(1 for k in params if k.startswith("key_"))
    for i in range(num_s):
        _mlp_from_flax(getattr(att, f"query_weight{i}"), params[f"query_{i}"])
    for j in range(num_t):
        _mlp_from_flax(getattr(att, f"key_weight{j}"), params[f"key_{j}"])
    for i in range(num_s):
        for j in range(num_t):
            _regressor_from_flax(getattr(att, "regressor" + str(i) + str(j)),
                                 params[f"regressor_{i}_{j}"], stats[f"regressor_{i}_{j}"])


def flax_tree(reference: SemCKDReference, num_s: int, num_t: int, grad: bool = False):
    """The reference's parameters (or their .grad), shaped and laid out like the Flax
    params."""
    get = (lambda p: p.grad) if grad else (lambda p: p.data)
    att = reference.self_attention

    def mlp(module):
        return {name: {"kernel": get(getattr(module, name).weight).numpy().T,
                       "bias": get(getattr(module, name).bias).numpy()}
                for name in ("linear1", "linear2")}

    def regressor(module):
        seq = module.regressor
        return {"conv1": {"kernel": get(seq[0].weight).numpy()[:, :, 0, 0].T},
                "bn1": {"scale": get(seq[1].weight).numpy(), "bias": get(seq[1].bias).numpy()},
                "conv2": {"kernel": get(seq[3].weight).numpy().transpose(2, 3, 1, 0)},
                "bn2": {"scale": get(seq[4].weight).numpy(), "bias": get(seq[4].bias).numpy()},
                "conv3": {"kernel": get(seq[6].weight).numpy()[:, :, 0, 0].T}}

    tree = {f"query_{i}": mlp(getattr(att, f"query_weight{i}")) for i in range(num_s)}
    tree.update({f"key_{j}": mlp(getattr(att, f"key_weight{j}")) for j in range(num_t)})
    tree.update({f"regressor_{i}_{j}": regressor(getattr(att, "regressor" + str(i) + str(j)))
                 for i in range(num_s) for j in range(num_t)})
    return tree


def running_stats(reference: SemCKDReference, num_s: int, num_t: int) -> dict:
    """The regressors' BN running statistics, shaped like the Flax batch_stats."""
    att = reference.self_attention
    tree = {}
    for i in range(num_s):
        for j in range(num_t):
            seq = getattr(att, "regressor" + str(i) + str(j)).regressor
            tree[f"regressor_{i}_{j}"] = {
                name: {"mean": bn.running_mean.numpy(), "var": bn.running_var.numpy()}
                for name, bn in (("bn1", seq[1]), ("bn2", seq[4]))}
    return tree
