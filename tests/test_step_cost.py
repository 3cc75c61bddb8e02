"""XLA's cost of a config's training step from shapes (l2t_jax/tools/step_cost.py): it
builds and compiles the step without data, weights or a source checkpoint, and the count is
the program's: proportional to the batch for a plain CE step, larger with a source to
match."""
from l2t_jax import configs
from l2t_jax.tools import step_cost


def _cost(method, batch_size, **overrides):
    config = configs.load("cifar100:tiny")      # the released source: not read, only shaped
    config.method, config.batch_size, config.conv_impl = method, batch_size, "native"
    for key, value in overrides.items():
        config[key] = value
    return step_cost.step_cost(config)


def test_the_count_follows_the_batch_and_the_method():
    scratch_8, scratch_16 = _cost("scratch", 8), _cost("scratch", 16)
    assert scratch_8["flops"] > 0 and scratch_8["compile_s"] > 0
    # The CE step is per-example work plus SGD on the parameters (a few per parameter).
    assert 1.97 < scratch_16["flops"] / scratch_8["flops"] <= 2.0
    # FM adds the source's forward pass (a full ResNet-32) and the matching heads.
    fm = _cost("fm", 8, pairs="one_to_one")
    assert fm["flops"] > 10 * scratch_8["flops"]
