"""Transfer loss terms: a new term is a function plus a method row (nothing else edited), it
is logged under its own name, and only the terms phi weights enter the simulated steps."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config, tiny_networks, write_npz_splits, write_tiny_source
from l2t_jax import models
from l2t_jax.training import build, train
from l2t_jax.transfer import bilevel, methods, terms


def _logit_penalty(inputs, transfer):
    """A term defined only here: 0.1 * the mean squared LwF-head logit (reads a part of
    theta, needs no pairs)."""
    return 0.1 * jnp.mean(jnp.square(inputs.lwf_logits))




def _source_energy(inputs, transfer):
    """Another term defined only here, constant in theta: 0.1 * the mean square of the
    first pair's source map. Any value of it in the simulated steps' objective would show."""
    return 0.1 * jnp.mean(jnp.square(inputs.matched_source[0]))


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The two terms and their methods, registered for this module's tests only."""
    terms.register(terms.LossTerm("test_logit_penalty", _logit_penalty, reads=("lwf_head",)))
    terms.register(terms.LossTerm("test_source_energy", _source_energy, needs_pairs=True))
    methods.register(methods.Method("test_fm_plus", "FM+penalty",
                                    ("feature_matching", "test_logit_penalty"),
                                    scheme="one_to_one"))
    methods.register(methods.Method("test_l2t_plus", "L2T-ww+energy",
                                    ("feature_matching", "test_source_energy"),
                                    meta_networks=True, learned_pair_weights=True,
                                    scheme="all_to_all"))
    yield
    for name in ("test_logit_penalty", "test_source_energy"):
        del terms.TERMS[name]
    for name in ("test_fm_plus", "test_l2t_plus"):
        del methods.METHODS[name]


def test_a_term_defined_here_trains_two_steps_through_the_program(tmp_path):
    write_npz_splits(tmp_path / "data")
    write_tiny_source(str(tmp_path / "source"))
    config = tiny_config(tmp_path / "data", tmp_path / "source", method="test_fm_plus",
                         pairs="one_to_one")
    config.epochs, config.steps_per_epoch = 1, 2
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert result["steps"] == 2 and result["method"] == "test_fm_plus"
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")
             if "train/ce" in line]
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        assert line["train/test_logit_penalty"] > 0 and line["train/feature_matching"] > 0
        np.testing.assert_allclose(line["train/transfer"], line["train/feature_matching"]
                                   + line["train/test_logit_penalty"], rtol=1e-6)
    assert methods.row_label("test_fm_plus", "one_to_one") == "FM+penalty (one-to-one)"


def test_only_phi_weighted_terms_enter_the_simulated_steps():
    """An extra term that phi does not weight is in the real step's loss, not in the
    simulated steps' objective: with a term constant in theta (so theta_1 is the same),
    L2T-ww with it has L2T-ww's simulated objective and meta loss, and a larger transfer."""
    source, target = tiny_networks()
    pairs = ((2, 0), (5, 1), (8, 4))
    rng = jax.random.key(0)
    source_variables = source.init(jax.random.fold_in(rng, 1), jnp.zeros((1, 32, 32, 3)),
                                   train=False)
    images = jax.random.normal(jax.random.fold_in(rng, 2), (4, 32, 32, 3))
    labels = jnp.arange(4) % 3
    outcomes = {}
    for method in ("l2t_ww", "test_l2t_plus"):
        transfer = build.method_transfer(method, source, target, pairs, inner_steps=1)
        state = bilevel.init_state(transfer, rng, (32, 32, 3))

        step = jax.jit(functools.partial(bilevel.train_step, transfer, lambda _: 0.1))
        _, outcomes[method] = step(state, source_variables, images, labels)
    assert build.method_transfer("test_l2t_plus", source, target, pairs).inner_terms == (
        terms.FEATURE_MATCHING,)
    plain, plus = outcomes["l2t_ww"], outcomes["test_l2t_plus"]
    assert float(plus["test_source_energy"]) > 0
    np.testing.assert_allclose(plus["transfer"], plain["transfer"]
                               + plus["test_source_energy"], rtol=1e-6)
    np.testing.assert_allclose(plus["sim_matching"], plain["sim_matching"], rtol=1e-6)
    np.testing.assert_allclose(plus["meta_loss"], plain["meta_loss"], rtol=1e-6)
    np.testing.assert_allclose(plus["meta_grad_norm"], plain["meta_grad_norm"], rtol=1e-5)


def test_registering_a_taken_name_or_an_unknown_part_fails():
    with pytest.raises(ValueError, match="already registered"):
        terms.register(terms.LossTerm("feature_matching", _logit_penalty))
    with pytest.raises(ValueError, match="reads unknown parts"):
        terms.register(terms.LossTerm("test_other", _logit_penalty, reads=("teacher",)))
    with pytest.raises(ValueError, match="no term for them to weight"):
        build.method_transfer(methods.Method("x", "X", ("test_logit_penalty",),
                                             meta_networks=True),
                              models.get_model("resnet20", 5), models.get_model("vgg9_bn", 3),
                              ())
