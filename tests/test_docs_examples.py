"""The code of docs/methods.md's "Extending" section runs as written: its blocks are read
from the page and executed (a loss term, a term with its own trainable part, a method
row), and the term with a part trains one step through the iteration. (The model family's
block names a class the page does not define; tests/test_model_families.py registers a
whole family from a test file.)"""
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO_ROOT, tiny_networks
from l2t_jax.training import build
from l2t_jax.transfer import bilevel, methods, terms

SECTIONS = ("A new loss term", "A term with its own trainable part", "A new method")


def python_blocks(page: str, heading: str) -> list[str]:
    """The fenced python blocks under the ``### heading`` of ``page``."""
    with open(os.path.join(REPO_ROOT, page), encoding="utf-8") as f:
        text = f.read()
    section = text.split(f"### {heading}\n", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)


@pytest.fixture(scope="module")
def page():
    """The page's blocks executed in one namespace; what they register is removed after."""
    namespace = {}
    for heading in SECTIONS:
        blocks = python_blocks("docs/methods.md", heading)
        assert blocks, heading
        for block in blocks:
            exec(compile(block, f"docs/methods.md: {heading}", "exec"), namespace)
    methods.register(methods.Method("gated", "Gated", terms=("gated_energy",)))
    yield namespace
    for name in ("logit_penalty", "gated_energy"):
        del terms.TERMS[name]
    for name in ("fm_penalty", "gated"):
        del methods.METHODS[name]


def test_the_page_registers_its_terms_and_method(page):
    assert terms.TERMS["logit_penalty"].reads == ("lwf_head",)
    gated = terms.TERMS["gated_energy"]
    assert gated.part is not None and gated.options == (("gate_weight", 0.1),)
    assert methods.get_method("fm_penalty").terms == ("feature_matching", "logit_penalty")


def test_the_term_with_a_part_trains_with_the_target(page):
    source, target = tiny_networks()
    rng = jax.random.key(0)
    source_variables = source.init(jax.random.fold_in(rng, 1), jnp.zeros((1, 32, 32, 3)),
                                   train=False)
    images = jax.random.normal(jax.random.fold_in(rng, 2), (4, 32, 32, 3))
    labels = jnp.arange(4) % 3
    transfer = build.method_transfer("gated", source, target, (), gate_weight=0.5)
    assert transfer.option("gate_weight") == 0.5
    state = bilevel.init_state(transfer, rng, (32, 32, 3))
    taps = len(target.feature_taps())
    np.testing.assert_array_equal(state.target_params["gated_energy"]["logits"],
                                  np.zeros(taps))
    step = jax.jit(functools.partial(bilevel.train_step, transfer, lambda _: 0.1))
    new_state, metrics = step(state, source_variables, images, labels)
    gates = np.asarray(metrics["gates"])
    assert gates.shape == (taps,) and np.isclose(gates.sum(), 1.0)
    assert float(metrics["gated_energy"]) > 0
    np.testing.assert_allclose(metrics["transfer"], metrics["gated_energy"], rtol=1e-6)
    assert not np.array_equal(new_state.target_params["gated_energy"]["logits"],
                              state.target_params["gated_energy"]["logits"])
    with pytest.raises(ValueError, match="config.gate_weight must be >= 0"):
        build.method_transfer("gated", source, target, (), gate_weight=-1.0)
