"""How much signal L2T-ww's meta-gradient carries over training, under several meta losses.

Trains one L2T-ww (all-to-all) cell of the offline study (configs/study.py: digits 0-4 ->
5-9, the demo's ResNet-20 source, a VGG-9-BN target, the study's recipe) with the library's
step (:func:`l2t_jax.transfer.bilevel.train_step`: the study's batches, schedule and seed;
``--check`` compares the run's val and test accuracies with the study's ``result.json``).
At probe steps, before the step, it draws ``--batches`` batches of the train split (the
study's augmentation, another seed) and computes, for each batch, the exact meta-gradient
d(meta loss)/d(phi) through the iteration's real step, T simulated steps and adaptation
step (docs/semantics.md) under five meta losses of the adapted parameters:

- ``same``: CE on the batch itself (the paper's; checked against
  :func:`l2t_jax.transfer.bilevel.meta_objective` at every probe);
- ``smooth``: CE against labels smoothed by 0.1 (Szegedy et al. 2016), on the batch;
- ``temperature``: CE of the logits divided by 4, on the batch;
- ``augment``: CE on another augmentation (crop) of the same images;
- ``val``: CE on as many val images (the held-out labels; a diagnostic only, no run here
  trains on them).

Per probe and meta loss it reports the mean gradient norm, the coherence
||mean g|| / mean ||g|| over the batches (1: every batch points the same way; about
1/sqrt(n) for unrelated directions), the mean pairwise cosine, and the cosine between the
loss's mean gradient and the ``val`` loss's mean gradient (does the signal point where
held-out images want phi to go). One JSON per cell; ``--summarize`` prints the tables.

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
      L2T_RELEASE_DIR=DIR taskset -c 1 python experiments/meta_gradient_probe.py \\
      --study-workdir=runs/study --out=runs/meta_probe --budgets 2 10 --seeds 0 1 2 \\
      [--check runs/study/runs]
    python experiments/meta_gradient_probe.py --out=runs/meta_probe --summarize

``--study-workdir`` is a study workdir whose data and demo source are written.
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from l2t_jax import data
from l2t_jax.configs import study as study_config
from l2t_jax.tools import study
from l2t_jax.training import build, compile_cache
from l2t_jax.transfer import bilevel, optim

META_LOSSES = ("same", "smooth", "temperature", "augment", "val")
LABEL_SMOOTHING = 0.1
TEMPERATURE = 4.0


def adapted_parameters(transfer, theta_1, momentum_1, batch_stats_1, batch, learning_rate):
    """phi -> the adapted parameters of steps 2-3 of the iteration (T simulated matching
    steps from theta_1, then one CE step), as :func:`bilevel._simulate_and_adapt` takes
    them (no remat); the probe checks that CE at them is that function's meta loss."""
    def adapted(meta_params):
        channel_weights, pair_weights = bilevel.meta_weights(transfer, meta_params,
                                                             batch.pooled_source)

        def matching(theta):
            _, values, _, _ = bilevel.target_losses(transfer, theta, batch_stats_1, batch,
                                                    transfer.inner_terms, channel_weights,
                                                    pair_weights)
            return bilevel.total(values)

        def cross_entropy(theta):
            return bilevel.target_losses(transfer, theta, batch_stats_1, batch, ())[0]

        theta, buffers = theta_1, momentum_1
        for _ in range(transfer.inner_steps):
            theta, buffers = optim.sgd_momentum(theta, buffers, jax.grad(matching)(theta),
                                                learning_rate, transfer.momentum,
                                                transfer.weight_decay)
        theta, _ = optim.sgd_momentum(theta, buffers, jax.grad(cross_entropy)(theta),
                                      learning_rate, transfer.momentum, transfer.weight_decay)
        return theta
    return adapted


def soft_cross_entropy(logits, targets):
    """Mean CE against target distributions (B, K) (one-hot: the library's CE)."""
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1))


def meta_gradients(transfer, schedule, state, source_variables, images, other_images, labels,
                   val_images, val_labels):
    """({meta loss: value}, {meta loss: d(loss)/d(phi)}, theta's learning rate) for one
    batch (``other_images``: the same images under another augmentation)."""
    learning_rate = schedule(state.step)
    batch = bilevel.batch_constants(transfer, state, source_variables, images, labels)
    theta_1, momentum_1, batch_stats_1, _ = bilevel.real_step(transfer, state, batch,
                                                              learning_rate)
    adapted = adapted_parameters(transfer, theta_1, momentum_1, batch_stats_1, batch,
                                 learning_rate)
    theta, pullback = jax.vjp(adapted, state.meta_params)

    def logits(theta, on_images):
        """The adapted target's train-mode logits on ``on_images`` (BN on their batch, as
        the library's meta loss)."""
        on = bilevel.BatchConstants(on_images, labels, (), (), None)
        return bilevel.target_losses(transfer, theta, batch_stats_1, on, ())[2]

    classes = transfer.target_model.num_classes
    one_hot = jax.nn.one_hot(labels, classes)
    smoothed = one_hot * (1 - LABEL_SMOOTHING) + LABEL_SMOOTHING / classes
    losses = {
        "same": lambda t: soft_cross_entropy(logits(t, images), one_hot),
        "smooth": lambda t: soft_cross_entropy(logits(t, images), smoothed),
        "temperature": lambda t: soft_cross_entropy(logits(t, images) / TEMPERATURE, one_hot),
        "augment": lambda t: soft_cross_entropy(logits(t, other_images), one_hot),
        "val": lambda t: soft_cross_entropy(logits(t, val_images),
                                            jax.nn.one_hot(val_labels, classes)),
    }
    # One batched pullback through the simulated steps for every loss: one backward graph
    # to compile instead of one per loss.
    values, theta_grads = zip(*(jax.value_and_grad(losses[name])(theta)
                                for name in META_LOSSES))
    stacked = jax.tree.map(lambda *g: jnp.stack(g), *theta_grads)
    phi_grads = jax.vmap(pullback)(stacked)[0]
    grads = {name: jax.tree.map(lambda g, i=i: g[i], phi_grads)
             for i, name in enumerate(META_LOSSES)}
    return dict(zip(META_LOSSES, values)), grads, learning_rate


def reference_gradient(transfer, schedule, state, source_variables, images, labels):
    """The paper's meta loss and its gradient from :func:`bilevel.meta_objective`."""
    objective = bilevel.meta_objective(transfer, state, source_variables, images, labels,
                                       schedule(state.step))
    (loss, _), grad = jax.value_and_grad(objective, has_aux=True)(state.meta_params)
    return loss, grad


def flat(tree, only: str = "") -> np.ndarray:
    """The leaves of phi's gradient as one vector (``only``: the leaves whose path holds it,
    e.g. ``where`` for the pair-weight networks)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return np.concatenate([np.ravel(np.asarray(v)) for path, v in leaves
                           if only in jax.tree_util.keystr(path)])


def agreement(vectors: list[np.ndarray]) -> dict:
    """Mean norm, coherence ||mean|| / mean norm, mean pairwise cosine, and the mean
    vector of per-batch gradients."""
    norms = [float(np.linalg.norm(v)) for v in vectors]
    mean = np.mean(vectors, axis=0)
    cosines = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
               for i, a in enumerate(vectors) for b in vectors[i + 1:]]
    return {"norm": float(np.mean(norms)),
            "coherence": float(np.linalg.norm(mean) / (np.mean(norms) + 1e-30)),
            "pairwise_cosine": float(np.mean(cosines)), "mean": mean}


def probe_batches(splits, run, step: int, count: int):
    """``count`` (images, other augmentation of the same images, labels, val images, val
    labels) batches for the probe at ``step``: train images sampled with replacement by
    class-balanced shuffles, two augmentations each; val images sampled anew per batch."""
    rng = np.random.default_rng([run.seed, step, 12345])
    size, batch = run.data.image_size, run.batch_size
    train, val = splits["train"], splits["val"]
    out = []
    for _ in range(count):
        chosen = rng.choice(len(train), batch, replace=len(train) < batch)
        examples = [train[int(i)] for i in chosen]
        views = []
        for _ in range(2):
            augmented = [data.train_example(e, rng, size, run.data.hflip,
                                            run.data.crop_padding) for e in examples]
            views.append(data.normalize_batch((np.stack([a[0] for a in augmented]),
                                               np.array([a[1] for a in augmented],
                                                        np.int32))))
        val_chosen = rng.choice(len(val), batch, replace=False)
        val_images, val_labels = _eval_batch(val, val_chosen, size)
        out.append((views[0][0], views[1][0], views[0][1], val_images, val_labels))
    return out


def _eval_batch(source, indices, size: int):
    images, labels = [], []
    for i in indices:
        image, label = data.eval_example(source[int(i)], size)
        images.append(image)
        labels.append(label)
    return data.normalize_batch((np.stack(images), np.array(labels, np.int32)))


def run_cell(args, k: int, seed: int, programs: dict) -> dict:
    config = study_config.get_config()
    cell = study.Cell("demo_resnet20", "l2t_ww:all_to_all", k, seed, study.cell_settings(config))
    run = study.cell_config(config, os.path.join(args.study_workdir, "data"),
                            os.path.join(args.study_workdir, "source_run", "source"), cell)
    splits = build.load_splits(run)
    transfer = build.build_transfer(run)
    source_variables = build.load_source_variables(run, transfer)
    steps_per_epoch = build.steps_per_epoch(run, len(splits["train"]))
    total = steps_per_epoch * run.epochs
    schedule = build.learning_rate_schedule(run, steps_per_epoch)
    if "step" not in programs:
        programs["step"] = jax.jit(functools.partial(bilevel.train_step, transfer, schedule),
                                   donate_argnums=0)
        programs["probe"] = jax.jit(functools.partial(meta_gradients, transfer, schedule))
        programs["reference"] = jax.jit(functools.partial(reference_gradient, transfer,
                                                          schedule))
    size = run.data.image_size
    state = bilevel.init_state(transfer, jax.random.key(run.seed), (size, size, 3),
                               jit=run.jit_init)
    batches = data.step_batches(splits["train"], range(total), steps_per_epoch=steps_per_epoch,
                                batch_size=run.batch_size, rows=slice(0, run.batch_size),
                                image_size=size, seed=run.seed, hflip=run.data.hflip,
                                crop_padding=run.data.crop_padding, threads=0,
                                prefetch_batches=0)
    evaluate = jax.jit(lambda variables, images: jnp.argmax(
        transfer.target_model.apply(variables, images, train=False)[0], -1))
    eval_sets = {split: _eval_batch(splits[split], range(len(splits[split])), size)
                 for split in ("val", "test")}
    probes, epochs, history = [], [], []
    for step, (images, labels) in enumerate(batches):
        if step in args.probe_steps:
            record = {"step": step}
            per_loss = {name: [] for name in META_LOSSES}
            check = []
            for b, batch in enumerate(probe_batches(splits, run, step, args.batches)):
                values, grads, lr = programs["probe"](state, source_variables, *batch)
                for name in META_LOSSES:
                    per_loss[name].append(grads[name])
                if b == 0:     # the paper's loss against the library's own meta objective
                    reference_loss, reference_grad = programs["reference"](
                        state, source_variables, batch[0], batch[2])
                    check.append(max(
                        abs(float(values["same"]) - float(reference_loss)) /
                        max(abs(float(reference_loss)), 1e-12),
                        float(np.linalg.norm(flat(grads["same"]) - flat(reference_grad)) /
                              (np.linalg.norm(flat(reference_grad)) + 1e-30))))
            record["learning_rate"] = float(lr)
            record["check_relative_error"] = max(check)
            means = {}
            for name in META_LOSSES:
                for part in ("", "where", "what"):
                    a = agreement([flat(g, part) for g in per_loss[name]])
                    means[(name, part)] = a.pop("mean")
                    record[f"{name}{'/' + part if part else ''}"] = a
            for name in META_LOSSES:
                for part in ("", "where", "what"):
                    a, b = means[(name, part)], means[("val", part)]
                    record[f"{name}{'/' + part if part else ''}"]["cosine_to_val"] = float(
                        a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
            probes.append(record)
        state, metrics = programs["step"](state, source_variables, images, labels)
        history.append({"step": step + 1, "ce": float(metrics["ce"]),
                        "meta_grad_norm": float(metrics["meta_grad_norm"]),
                        "pair_weights": np.asarray(metrics["pair_weights"]).tolist(),
                        "channel_weight_entropy":
                            np.asarray(metrics["channel_weight_entropy"]).tolist()})
        if (step + 1) % steps_per_epoch == 0:
            variables = {"params": state.target_params["model"],
                         "batch_stats": state.batch_stats}
            epochs.append({split: 100.0 * float(np.mean(np.asarray(
                evaluate(variables, images_)) == labels_))
                for split, (images_, labels_) in eval_sets.items()})
    best = max(e["val"] for e in epochs)
    chosen = next(e for e in epochs if e["val"] == best)
    result = {"examples_per_class": k, "seed": seed, "probes": probes, "epochs": epochs,
              "history": history, "test_at_best_val": chosen["test"], "best_val": best}
    if args.check:
        path = os.path.join(cell.directory(args.check), "result.json")
        if os.path.isfile(path):
            with open(path) as f:
                recorded = json.load(f)
            result["study_run"] = {"test_at_best_val": recorded["test_at_best_val"],
                                   "best_val": recorded["best_val"]}
    return result


def summarize(args) -> None:
    results = []
    for path in sorted(glob.glob(os.path.join(args.out, "epc*_seed*.json"))):
        with open(path) as f:
            results.append(json.load(f))
    for k in sorted({r["examples_per_class"] for r in results}):
        cells = [r for r in results if r["examples_per_class"] == k]
        print(f"\n### {k} per class ({len(cells)} seeds; mean over seeds)\n")
        for r in cells:
            same = r.get("study_run")
            print(f"- seed {r['seed']}: test {r['test_at_best_val']:.2f} at val "
                  f"{r['best_val']:.2f}" + (f" (study's run: {same['test_at_best_val']:.2f} at "
                                           f"{same['best_val']:.2f})" if same else "")
                  + f"; largest relative error against bilevel.meta_objective: "
                  f"{max(p['check_relative_error'] for p in r['probes']):.1e}")
        steps = [p["step"] for p in cells[0]["probes"]]
        for part in ("", "where", "what"):
            print(f"\n{'all of phi' if not part else part + ' networks only'}: norm / "
                  "coherence / pairwise cosine / cosine to val\n")
            print("| step | lr | train CE | " + " | ".join(META_LOSSES) + " |")
            print("|---" * (3 + len(META_LOSSES)) + "|")
            for i, step in enumerate(steps):
                row = []
                for name in META_LOSSES:
                    key = name + ("/" + part if part else "")
                    values = [[r["probes"][i][key][m] for r in cells]
                              for m in ("norm", "coherence", "pairwise_cosine", "cosine_to_val")]
                    row.append(" / ".join(f"{statistics.mean(v):.3g}" if j == 0 else
                                          f"{statistics.mean(v):.2f}"
                                          for j, v in enumerate(values)))
                ce = statistics.mean(
                    statistics.mean(h["ce"] for h in r["history"][max(0, step - 5):step + 5])
                    for r in cells)
                lr = cells[0]["probes"][i]["learning_rate"]
                print(f"| {step} | {lr:.4f} | {ce:.3f} | " + " | ".join(row) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study-workdir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--budgets", nargs="+", type=int, default=[2, 10])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=8, help="batches per probe")
    parser.add_argument("--probe-steps", dest="probe_steps", nargs="+", type=int,
                        default=[0, 20, 40, 60, 80, 100, 120, 135])
    parser.add_argument("--check", help="the study's runs directory (DIR/runs): compare")
    parser.add_argument("--summarize", action="store_true")
    args = parser.parse_args(argv)
    if args.summarize:
        summarize(args)
        return
    if not args.study_workdir:
        parser.error("--study-workdir is required to run cells")
    if not compile_cache.configured():
        compile_cache.enable()
    os.makedirs(args.out, exist_ok=True)
    programs = {}
    for k in args.budgets:
        for seed in args.seeds:
            out = os.path.join(args.out, f"epc{k}_seed{seed}.json")
            if os.path.isfile(out):
                continue
            result = run_cell(args, k, seed, programs)
            print(f"{k} per class, seed {seed}: test {result['test_at_best_val']:.2f} at val "
                  f"{result['best_val']:.2f}"
                  + (f" (study's run {result['study_run']})" if "study_run" in result else ""),
                  flush=True)
            with open(out, "w") as f:
                json.dump(result, f)


if __name__ == "__main__":
    main()
