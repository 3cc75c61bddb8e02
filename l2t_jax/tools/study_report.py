"""The offline study's report (``DIR/report``): study.md, main.csv, paired.csv, pictures.

Its input is the study's records (:func:`l2t_jax.tools.study.load_records`): one per cell of
each grid, with the cell's source, method entry, budget, seed, the value of every setting a
grid varies, its directory and its result (None while unfinished). Nothing here knows how
cells are made: a section selects its grid's records by these fields.

- **Statistics**: :func:`paired_difference` (the 95% t interval of paired differences).
- **Row builders**, records -> rows of numbers, one per section: :func:`recipe_rows`,
  :func:`recipe_mean_val`, :func:`main_rows`, :func:`paired_rows`, :func:`dynamics_rows`,
  :func:`meta_batch_rows`, :func:`every_k_rows`, :func:`sensitivity_rows`,
  :func:`screen_rows`, :func:`screen_choice`, :func:`objective_rows`, :func:`provenance`.
- **Renderers**, rows -> markdown lines (``*_lines``), CSV (:func:`main_csv_rows`,
  :func:`write_csv`) and pictures (``draw_*``, through :mod:`l2t_jax.tools.metric_plots` and
  :mod:`l2t_jax.tools.weight_plots`).
- :func:`write_report` puts them together for the grids of ``config.grids``.

Accuracies are test accuracy (%) at the last epoch (result.json's ``test_last``: no
selection on val), and val accuracy at the last epoch where val is shown; "mean ± std (n)"
cells give the sample std over seeds; cells with no finished run show ``-``. (The paper's
tables, :mod:`l2t_jax.tools.summaries`, keep the paper's test accuracy at the best val.)
"""
from __future__ import annotations

import csv
import logging
import math
import os
from typing import Any, Iterable, Sequence

from l2t_jax.tools import digits, summaries

logger = logging.getLogger(__name__)

# The main grid's paired comparisons (a − b), where both methods ran.
PAIRED = (("l2t_ww:all_to_all", "fm:one_to_one"), ("l2t_ww:all_to_all", "fm:all_to_all"),
          ("fm:all_to_all", "fm:one_to_one"),
          ("l2t_w:one_to_one", "fm:one_to_one"), ("fm:one_to_one", "scratch"),
          ("l2t_ww:all_to_all", "scratch"),
          # The methods that learn where with an attention trained with the target.
          ("afd:all_to_all", "l2t_ww:all_to_all"), ("afd:all_to_all", "fm:one_to_one"),
          ("afd:all_to_all", "fm:all_to_all"), ("semckd:all_to_all", "l2t_ww:all_to_all"),
          ("semckd:all_to_all", "fm:one_to_one"), ("semckd:all_to_all", "fm:all_to_all"))
# The methods that learn where to transfer, plotted side by side
# (weight_plots.plot_where_compare).
LEARNED_WHERE = ("l2t_ww:all_to_all", "afd:all_to_all", "semckd:all_to_all")
PROBE = "l2t_ww:all_to_all"      # the method the probe grids vary
# What the meta objectives' runs are paired against: main grid methods, in this order.
OBJECTIVE_BASELINES = ("fm:one_to_one", "fm:all_to_all", PROBE)
# The accuracies the report reads (summaries.load_result's fields): the last epoch's.
TEST, VAL = "test_last", "val_last"


# ------------------------------------------------------------------------- statistics
def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """a - b paired by position (the same seed): n, mean, sample std and the 95% t
    interval of the mean difference (Student's t, n - 1 degrees of freedom)."""
    from scipy import stats
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired_difference needs two equal lists of >= 2 values, got "
                         f"{len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean, std = summaries.mean_std(diffs)
    half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half}


def _paired(a: dict[int, dict], b: dict[int, dict], seeds: Iterable[int]) -> dict | None:
    """:func:`paired_difference` of the test accuracies of the seeds both finished (None
    under two)."""
    pairs = [(a[s][TEST], b[s][TEST]) for s in seeds if s in a and s in b]
    return paired_difference(*zip(*pairs)) if len(pairs) >= 2 else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _final(history: list[dict], key: str, last: int = 10) -> float | None:
    """Mean of the last ``last`` logged values of ``key`` (the end of training)."""
    values = [r[key] for r in history if key in r][-last:]
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------- records
def select(records: Iterable[dict], **fields) -> list[dict]:
    """The records whose ``fields`` have these values, in order."""
    return [r for r in records if all(r[k] == v for k, v in fields.items())]


def by_seed(records: Iterable[dict]) -> dict[int, dict]:
    """{seed: result} of the finished ``records``."""
    return {r["seed"]: r["result"] for r in records if r["result"] is not None}


def values(records: Iterable[dict], key: str = TEST) -> list[float]:
    """The results' ``key`` (by default the test accuracy at the last epoch) of the
    finished ``records``, in order."""
    return [r["result"][key] for r in records if r["result"] is not None]


def unique(records: Iterable[dict]) -> list[dict]:
    """One record per run directory (grids share runs), in first-seen order."""
    seen: dict[str, dict] = {}
    for r in records:
        seen.setdefault(r["directory"], r)
    return list(seen.values())


def label(entry: str) -> str:
    """The paper's row label of a method entry: ``fm:one_to_one`` -> ``FM (one-to-one)``."""
    from l2t_jax.transfer import methods
    return methods.row_label(*digits.parse_entry(entry))


def main_budgets(records: Iterable[dict], source: str, grid: str = "main") -> list[int]:
    """The label budgets of ``source`` in ``grid`` (the main grid's), in grid order."""
    found: list[int] = []
    for r in select(records, grid=grid, source=source):
        if r["examples_per_class"] not in found:
            found.append(r["examples_per_class"])
    return found


# ----------------------------------------------------------------------- row builders
def provenance(records: Iterable[dict]) -> dict[str, dict[str, int]]:
    """Which commits and machines made the finished runs: {"commits": {commit: runs},
    "machines": {cpu, jax and XLA_FLAGS: runs}}."""
    commits: dict[str, int] = {}
    machines: dict[str, int] = {}
    for r in unique(records):
        if r["result"] is None:
            continue
        run = r["result"]["run"]
        git = run.get("git") or {}
        key = (git.get("commit", "?")[:7] + (" (dirty)" if git.get("dirty") else "")
               if git else "not a checkout")
        commits[key] = commits.get(key, 0) + 1
        machine = (f"{run.get('cpu')}, jax {run['versions'].get('jax')}, "
                   f"XLA_FLAGS '{run.get('xla_flags', '')}'")
        machines[machine] = machines.get(machine, 0) + 1
    return {"commits": commits, "machines": machines}


def recipe_rows(config, records: list[dict]) -> list[dict]:
    """Per recipe method, budget and theta's learning rate: the val and test accuracies
    over the recipe's seeds."""
    grid = select(records, grid="recipe")
    return [{"entry": entry, "examples_per_class": k, "learning_rate": lr,
             "val": values(cells, VAL), "test": values(cells)}
            for entry in config.recipe_methods for k in config.recipe_examples_per_class
            for lr in config.recipe_learning_rates
            for cells in [select(grid, entry=entry, examples_per_class=k, learning_rate=lr)]]


def recipe_mean_val(config, records: list[dict]) -> dict[float, float]:
    """{theta's learning rate: mean val accuracy of every finished recipe run with it}."""
    grid = select(records, grid="recipe")
    means = {}
    for lr in config.recipe_learning_rates:
        val = values(select(grid, learning_rate=lr), VAL)
        if val:
            means[lr] = sum(val) / len(val)
    return means


def main_rows(config, records: list[dict]) -> list[dict]:
    """Per source, method and budget of the main grid: the test accuracies and the runs'
    wall seconds over seeds."""
    rows = []
    for source in config.sources:
        for entry in config.methods:
            for k in main_budgets(records, source):
                cells = select(records, grid="main", source=source, entry=entry,
                               examples_per_class=k)
                rows.append({"source": source, "entry": entry, "examples_per_class": k,
                             "test": values(cells), "seconds": values(cells, "wall_seconds")})
    return rows


def paired_rows(config, records: list[dict]) -> list[dict]:
    """Per source, comparison of :data:`PAIRED` (both methods in the grid) and budget: the
    :func:`paired_difference` of a − b over the seeds both finished (``difference`` None
    under two)."""
    rows = []
    for source in config.sources:
        for a, b in PAIRED:
            if a not in config.methods or b not in config.methods:
                continue
            for k in main_budgets(records, source):
                runs = [by_seed(select(records, grid="main", source=source, entry=entry,
                                       examples_per_class=k)) for entry in (a, b)]
                rows.append({"source": source, "a": a, "b": b, "examples_per_class": k,
                             "difference": _paired(*runs, config.seeds)})
    return rows


def dynamics_rows(config, records: list[dict]) -> list[dict]:
    """What phi did in the main grid's L2T-ww runs, per source and budget, mean over seeds:
    the first and last (mean of the last 10 logged) meta-gradient norm, the pairs whose
    lambda ends above 0.1 and the number of pairs."""
    rows = []
    for source in config.sources:
        for k in main_budgets(records, source):
            found = [r["result"] for r in select(records, grid="main", source=source,
                                                    entry=PROBE, examples_per_class=k)
                     if r["result"] is not None]
            if not found:
                continue
            first = _mean([next((h["train/meta_grad_norm"] for h in f["history"]
                                 if "train/meta_grad_norm" in h), None) for f in found])
            last = _mean([_final(f["history"], "train/meta_grad_norm") for f in found])
            active, pairs = [], 0
            for f in found:
                keys = sorted({key for h in f["history"] for key in h
                               if key.startswith("train/pair_weights/")})
                active.append(sum(1 for key in keys if (_final(f["history"], key) or 0) > 0.1))
                pairs = len(keys)
            rows.append({"source": source, "examples_per_class": k, "first": first,
                         "last": last, "active": _mean(active), "pairs": pairs})
    return rows


def meta_batch_rows(config, records: list[dict]) -> list[dict]:
    """Per budget: the probe's test accuracies with the meta loss on the same batch and on
    held-out images, their paired difference (held_out − same), and each one's final
    meta-gradient norm (mean over seeds)."""
    grid = select(records, grid="meta_batch")
    rows = []
    for k in config.meta_batch_examples_per_class:
        same, held = (select(grid, examples_per_class=k, meta_loss_batch=batch)
                      for batch in ("same", "held_out"))
        rows.append({"examples_per_class": k, "same": values(same), "held_out": values(held),
                     "difference": _paired(by_seed(held), by_seed(same), config.seeds),
                     "norms": [_mean([_final(r["result"]["history"], "train/meta_grad_norm")
                                      for r in group if r["result"] is not None])
                               for group in (same, held)],
                     "directories": {"same": [r["directory"] for r in same if r["result"]],
                                     "held_out": [r["directory"] for r in held
                                                  if r["result"]]}})
    return rows


def every_k_rows(config, records: list[dict]) -> list[dict]:
    """Per k: the probe's test accuracies with phi every k-th iteration, their paired
    difference against k = 1 (None for k = 1), and the mean seconds per run."""
    grid = select(records, grid="every_k")
    every_step = select(grid, meta_update_every=1)
    rows = []
    for every in config.every_k:
        cells = select(grid, meta_update_every=every)
        rows.append({"every": every, "test": values(cells),
                     "difference": (_paired(by_seed(cells), by_seed(every_step), config.seeds)
                                    if every != 1 else None),
                     "seconds": _mean(values(cells, "wall_seconds"))})
    return rows


def sensitivity_rows(config, records: list[dict]) -> list[dict]:
    """Per meta learning rate and T: the probe's test accuracies."""
    grid = select(records, grid="sensitivity")
    return [{"meta_learning_rate": rate, "T": steps,
             "test": values(select(grid, meta_learning_rate=rate, T=steps))}
            for rate in config.sensitivity_meta_learning_rates
            for steps in config.sensitivity_T]


def screen_rows(config, records: list[dict]) -> list[dict]:
    """Per objective of the screen and meta learning rate: the last epoch's val accuracies
    per budget (``val``: {k: [...]}) and all of them (``all``)."""
    grid = select(records, grid="meta_screen")
    rows = []
    for objective in config.screen_objectives:
        for rate in config.screen_meta_learning_rates:
            cells = select(grid, objective=objective, meta_learning_rate=rate)
            rows.append({"objective": objective, "meta_learning_rate": rate,
                         "val": {k: values(select(cells, examples_per_class=k), VAL)
                                 for k in config.screen_examples_per_class},
                         "all": values(cells, VAL)})
    return rows


def screen_choice(rows: list[dict]) -> dict[str, float]:
    """{objective: the meta learning rate of its best mean val accuracy over every budget
    and seed of the screen} (objectives with a finished run)."""
    best: dict[str, tuple[float, float]] = {}
    for r in rows:
        if r["all"]:
            mean = sum(r["all"]) / len(r["all"])
            if r["objective"] not in best or mean > best[r["objective"]][1]:
                best[r["objective"]] = (r["meta_learning_rate"], mean)
    return {objective: rate for objective, (rate, _) in best.items()}


def objective_rows(config, records: list[dict]) -> list[dict]:
    """Per source, objective of the meta_objective grid and budget: its test accuracies
    and seconds per run, and its :func:`paired_difference` against each of
    :data:`OBJECTIVE_BASELINES` in the main grid (``differences``: {entry: difference or
    None}), over the seeds both finished."""
    rows = []
    for source in config.sources:
        for objective in config.meta_objective_learning_rates:
            for k in main_budgets(records, source, grid="meta_objective"):
                cells = select(records, grid="meta_objective", source=source,
                               objective=objective, examples_per_class=k)
                differences = {}
                for entry in OBJECTIVE_BASELINES:
                    baseline = select(records, grid="main", source=source, entry=entry,
                                      examples_per_class=k)
                    differences[entry] = _paired(by_seed(cells), by_seed(baseline),
                                                 config.seeds) if baseline else None
                rows.append({"source": source, "objective": objective,
                             "examples_per_class": k, "test": values(cells),
                             "seconds": values(cells, "wall_seconds"),
                             "directories": [r["directory"] for r in cells
                                             if r["result"] is not None],
                             "differences": differences})
    return rows


# ------------------------------------------------------------------- markdown renderers
def _stats(values: Sequence[float]) -> str:
    """``"72.00 ± 2.00 (3)"``; ``-`` for no values."""
    if not values:
        return "-"
    mean, std = summaries.mean_std(values)
    return f"{mean:.2f} ± {std:.2f} ({len(values)})"


def _interval(d: dict | None) -> str:
    """``"+2.00 [+0.10, +3.90]"``; ``-`` for None."""
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]" if d else "-"


def header_lines(config, records: list[dict]) -> list[str]:
    """The title, the recipe and how many runs finished; who made them."""
    runs = unique(records)
    made = provenance(records)
    return ["# The offline study: when does L2T-ww pay off?", "",
            f"{sum(r['result'] is not None for r in runs)} of {len(runs)} runs finished. "
            f"Digits 0-4 -> 5-9 ({config.target_model} target, widths "
            f"{tuple(config.target_widths)}), batch {config.batch_size}, "
            f"{config.epochs * config.steps_per_epoch} steps, theta's learning rate "
            f"{config.learning_rate:g} (cosine), meta learning rate "
            f"{config.meta_learning_rate:g}, T = {config.T}, beta = {config.beta:g}. Test "
            "accuracy (%) at the last epoch (no selection on val): mean ± sample std "
            "(seeds).", "",
            "Made by: " + "; ".join(f"commit {c} ({n} runs)"
                                    for c, n in made["commits"].items())
            + ". Machines: " + "; ".join(f"{m} ({n} runs)" for m, n in made["machines"].items())
            + ". Commands: `commands.txt`.", ""]


def recipe_lines(config, rows: list[dict], mean_val: dict[float, float]) -> list[str]:
    """The recipe grid: theta's learning rate, chosen on val."""
    lines = ["## Recipe: theta's learning rate (Scratch and FM; chosen on val)", "",
             "| method | per class | " + " | ".join(f"lr {lr:g}" for lr in
                                                    config.recipe_learning_rates) + " |",
             "|---" * (2 + len(config.recipe_learning_rates)) + "|"]
    for entry in config.recipe_methods:
        for k in config.recipe_examples_per_class:
            mine = [r for r in rows if (r["entry"], r["examples_per_class"]) == (entry, k)]
            lines.append(f"| {label(entry)} | {k} | " + " | ".join(
                f"val {_stats(r['val'])}, test {_stats(r['test'])}" for r in mine) + " |")
    if mean_val:
        best = max(mean_val, key=mean_val.get)
        lines += ["", "Mean val accuracy over these rows: " + ", ".join(
            f"{v:.2f}% at {lr:g}" for lr, v in mean_val.items())
            + f". The best is {best:g}; the study's recipe uses {config.learning_rate:g}."]
    return lines + [""]


def main_lines(config, records: list[dict], rows: list[dict],
               paired: list[dict]) -> list[str]:
    """Per source: the accuracy table (methods x budgets, seconds per run) and the paired
    differences."""
    lines = []
    for source in config.sources:
        budgets = main_budgets(records, source)
        lines += [f"## Main: source {source}", "",
                  "| method | " + " | ".join(f"{k} / class" for k in budgets)
                  + " | seconds per run |", "|---" * (2 + len(budgets)) + "|"]
        for entry in config.methods:
            mine = [r for r in rows if r["source"] == source and r["entry"] == entry]
            seconds = [s for r in mine for s in r["seconds"]]
            lines.append(f"| {label(entry)} | " + " | ".join(_stats(r["test"]) for r in mine)
                         + " | " + (f"{sum(seconds) / len(seconds):.0f}" if seconds else "-")
                         + " |")
        lines += ["", "Paired differences over seeds (same labelled subsets), mean "
                  "[95% t interval]:", "",
                  "| difference | " + " | ".join(f"{k} / class" for k in budgets) + " |",
                  "|---" * (1 + len(budgets)) + "|"]
        for a, b in PAIRED:
            mine = [r for r in paired if (r["source"], r["a"], r["b"]) == (source, a, b)]
            if mine:
                lines.append(f"| {label(a)} − {label(b)} | "
                             + " | ".join(_interval(r["difference"]) for r in mine) + " |")
        lines.append("")
    return lines


def dynamics_lines(rows: list[dict]) -> list[str]:
    """What L2T-ww's meta-networks did in the main grid."""
    lines = ["### What L2T-ww's meta-networks did (main grid, mean over seeds, last 10 "
             "logged steps)", "", "| source | per class | meta-grad norm, first / last | "
             "pairs with mean lambda > 0.1 |", "|---|---|---|---|"]
    lines += [f"| {r['source']} | {r['examples_per_class']} | {r['first']:.3f} / "
              f"{r['last']:.3f} | {r['active']:.1f} of {r['pairs']} |" for r in rows]
    return lines + [""]


def meta_batch_lines(config, rows: list[dict], pictures: list[str]) -> list[str]:
    """Held-out against same-batch meta loss, paired, with the meta-gradient norms, then
    ``pictures`` (:func:`draw_meta_batch`'s image lines)."""
    lines = [f"## Meta loss on held-out labelled images (L2T-ww, {config.probe_source})",
             "", "held_out: m = max(1, round("
             f"{config.meta_held_out_fraction:g} k)) of the k images per class score "
             "the adapted parameters (the target trains on k - m); same: the paper's "
             "meta loss on the training batch. Paired differences over seeds.", "",
             "| per class | same | held_out | held_out − same | final meta-grad norm "
             "(same / held_out) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['examples_per_class']} | {_stats(r['same'])} | "
                     f"{_stats(r['held_out'])} | {_interval(r['difference'])} | "
                     + " / ".join("-" if v is None else f"{v:.3f}" for v in r["norms"])
                     + " |")
    return lines + ["", *pictures, ""]


def every_k_lines(config, records: list[dict], rows: list[dict]) -> list[str]:
    """Accuracy and seconds per run against k (phi every k-th iteration), paired against
    k = 1 (the paper's rule); FM (one-to-one) at the probe's budget for scale."""
    fm = select(records, grid="main", source=config.probe_source, entry="fm:one_to_one",
                examples_per_class=config.probe_examples_per_class)
    base = next((r["seconds"] for r in rows if r["every"] == 1), None)
    lines = [f"## phi every k-th iteration (L2T-ww, {config.probe_source}, "
             f"{config.probe_examples_per_class} per class)", "",
             f"FM (one-to-one) at this budget: {_stats(values(fm))}. Seconds: the "
             "training loop's wall time (result.json: loading the compiled step from the "
             "cache, the steps, the evaluations; not the start-up before it).", "",
             "| k | test accuracy | k − (k = 1), paired | seconds per run | time / k = 1 |",
             "|---|---|---|---|---|"]
    for r in rows:
        seconds = r["seconds"]
        lines.append(f"| {r['every']} | {_stats(r['test'])} | {_interval(r['difference'])} | "
                     + (f"{seconds:.0f}" if seconds else "-") + " | "
                     + (f"{seconds / base:.2f}" if seconds and base else "-") + " |")
    return lines + [""]


def sensitivity_lines(config, rows: list[dict]) -> list[str]:
    """L2T-ww over meta learning rate x T."""
    lines = [f"## Sensitivity (L2T-ww, {config.probe_source}, "
             f"{config.probe_examples_per_class} per class)", "",
             "| meta learning rate | " + " | ".join(f"T = {t}" for t in config.sensitivity_T)
             + " |", "|---" * (1 + len(config.sensitivity_T)) + "|"]
    for rate in config.sensitivity_meta_learning_rates:
        lines.append(f"| {rate:g} | " + " | ".join(
            _stats(r["test"]) for r in rows if r["meta_learning_rate"] == rate) + " |")
    return lines + [""]


def objective_label(objective: str) -> str:
    """``L2T-ww (val)``: L2T-ww (all-to-all) with a meta objective of the meta grids."""
    return f"L2T-ww ({objective})"


def screen_lines(config, rows: list[dict]) -> list[str]:
    """The screen: val accuracy per objective and meta learning rate, the chosen rate
    marked."""
    chosen = screen_choice(rows)
    budgets = config.screen_examples_per_class
    lines = [f"## Meta objectives: the screen (L2T-ww, {config.probe_source}, seeds "
             f"{', '.join(map(str, config.screen_seeds))}; chosen on val)", "",
             "Val accuracy (%) at the last epoch, on the val images no meta loss trains on; "
             "each objective's meta learning rate is the best mean over its budgets and "
             "seeds (**bold**). Test accuracy is not shown: nothing here is chosen on it.", "",
             "| objective | meta learning rate | " + " | ".join(
                 f"val, {k} / class" for k in budgets) + " | mean val |",
             "|---" * (3 + len(budgets)) + "|"]
    for r in rows:
        mean = f"{sum(r['all']) / len(r['all']):.2f}" if r["all"] else "-"
        if chosen.get(r["objective"]) == r["meta_learning_rate"]:
            mean = f"**{mean}**"
        lines.append(f"| {r['objective']} | {r['meta_learning_rate']:g} | " + " | ".join(
            _stats(r["val"][k]) for k in budgets) + f" | {mean} |")
    return lines + [""]


def objective_lines(config, rows: list[dict], pictures: list[str]) -> list[str]:
    """Per source: the objectives' test accuracies per budget and their paired differences
    against :data:`OBJECTIVE_BASELINES`, then ``pictures`` (:func:`draw_objectives`)."""
    lines = []
    for source in config.sources:
        mine = [r for r in rows if r["source"] == source]
        budgets = sorted({r["examples_per_class"] for r in mine})
        if not mine:
            continue
        on_val = [objective_label(o) for o in config.meta_objective_learning_rates
                  if config.meta_objectives[o].get("meta_loss_batch") == "val"]
        lines += [f"## Meta objectives: source {source}", "",
                  "L2T-ww (all-to-all) with each objective at its screened meta learning "
                  "rate (" + ", ".join(f"{o} {rate:g}" for o, rate in
                                        config.meta_objective_learning_rates.items())
                  + f"); the main grid's seeds. {label(PROBE)} is the main grid's run: "
                  f"the paper's meta loss at meta learning rate {config.meta_learning_rate:g}."
                  + (f" {' and '.join(on_val)} {'trains' if len(on_val) == 1 else 'train'} "
                     f"phi on {config.meta_val_per_class} val images per class beyond the "
                     "budget (the val accuracy of every run is on the other val images)."
                     if on_val else ""), "",
                  "| objective | " + " | ".join(f"{k} / class" for k in budgets)
                  + " | seconds per run |", "|---" * (2 + len(budgets)) + "|"]
        for objective in config.meta_objective_learning_rates:
            cells = [r for r in mine if r["objective"] == objective]
            seconds = [x for r in cells for x in r["seconds"]]
            lines.append(f"| {objective_label(objective)} | "
                         + " | ".join(_stats(r["test"]) for r in cells) + " | "
                         + (f"{sum(seconds) / len(seconds):.0f}" if seconds else "-") + " |")
        lines += ["", "Paired differences over seeds, mean [95% t interval]:", "",
                  "| difference | " + " | ".join(f"{k} / class" for k in budgets) + " |",
                  "|---" * (1 + len(budgets)) + "|"]
        for objective in config.meta_objective_learning_rates:
            cells = [r for r in mine if r["objective"] == objective]
            for entry in OBJECTIVE_BASELINES:
                lines.append(f"| {objective_label(objective)} − {label(entry)} | "
                             + " | ".join(_interval(r["differences"][entry]) for r in cells)
                             + " |")
        lines.append("")
    return lines + pictures + [""]


# ---------------------------------------------------------------- CSV and pictures
def main_csv_rows(rows: list[dict]) -> list[dict[str, Any]]:
    """main.csv: source, method, budget, n, mean, std of every main row with a run."""
    out = []
    for r in rows:
        if r["test"]:
            mean, std = summaries.mean_std(r["test"])
            out.append({"source": r["source"], "method": label(r["entry"]),
                        "examples_per_class": r["examples_per_class"], "n": len(r["test"]),
                        "mean": mean, "std": std})
    return out


def paired_csv_rows(rows: list[dict]) -> list[dict[str, Any]]:
    """paired.csv: source, a, b, budget and :func:`paired_difference`'s fields."""
    return [{"source": r["source"], "a": label(r["a"]), "b": label(r["b"]),
             "examples_per_class": r["examples_per_class"], **r["difference"]}
            for r in rows if r["difference"]]


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    """``rows`` as CSV, the first row's keys as header; nothing for no rows."""
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def draw_main(config, records: list[dict], out: str) -> list[str]:
    """The main grid's pictures, as markdown image lines: accuracy against budget
    (``limited_data.png``); learning curves of every method at each source's smallest and
    largest budgets; what phi learned (pair and channel weights) in the probe's first
    seed."""
    from l2t_jax.tools import metric_plots, weight_plots
    lines = []
    main = {r["directory"] for r in select(records, grid="main")}
    results = [dict(r["result"], column=f"digits, {r['source']}") for r in unique(records)
               if r["directory"] in main and r["result"] is not None]
    if results:
        metric_plots.plot_limited_data(results, os.path.join(out, "limited_data.png"),
                                       accuracy=TEST)
        lines += ["![accuracy against label budget](limited_data.png)", ""]
    lines += dynamics_lines(dynamics_rows(config, records))
    for source in config.sources:
        budgets = main_budgets(records, source)
        for k in sorted({min(budgets), max(budgets)} if budgets else ()):
            curves = {}
            for entry in config.methods:
                found = [r["directory"] for r in select(records, grid="main", source=source,
                                                        entry=entry, examples_per_class=k)
                         if r["result"] is not None]
                if found:
                    curves[label(entry)] = found
            if curves:
                name = f"learning_curves_{source}_epc{k}.png"
                metric_plots.plot_learning_curves(curves, os.path.join(out, name))
                lines.append(f"![learning curves, {source}, {k} per class]({name})")
    lines += _where_compare(config, records, out)
    example = [r for r in select(records, grid="main", source=config.probe_source, entry=PROBE,
                                 examples_per_class=config.probe_examples_per_class,
                                 seed=config.seeds[0]) if r["result"] is not None]
    if example:
        for name, draw in (("pair_weights.png", weight_plots.plot_pair_weights),
                           ("channel_weights.png", weight_plots.plot_channel_weights)):
            draw(example[0]["directory"], os.path.join(out, name))
            lines.append(f"![{name[:-4].replace('_', ' ')}, {config.probe_source}, "
                         f"{config.probe_examples_per_class} per class, seed "
                         f"{config.seeds[0]}]({name})")
    return lines + [""]


def _where_compare(config, records: list[dict], out: str) -> list[str]:
    """Where each method of :data:`LEARNED_WHERE` in the main grid put the transfer, per
    source at the probe's budget: L2T-ww's pair weights beside AFD's and SemCKD's
    attention, each averaged over its seeds (``where_<source>_epc<k>.png``)."""
    from l2t_jax.tools import weight_plots
    lines, k = [], config.probe_examples_per_class
    for source in config.sources:
        groups = {}
        for entry in LEARNED_WHERE:
            found = [r["directory"] for r in select(records, grid="main", source=source,
                                                    entry=entry, examples_per_class=k)
                     if r["result"] is not None]
            if found and entry in config.methods:
                groups[label(entry)] = found
        if len(groups) > 1:
            name = f"where_{source}_epc{k}.png"
            weight_plots.plot_where_compare(groups, os.path.join(out, name))
            lines.append(f"![where each method transfers, {source}, {k} per class]({name})")
    return lines


def draw_meta_batch(rows: list[dict], out: str) -> list[str]:
    """The meta-gradient norm over training, same-batch against held-out meta loss, per
    budget where both finished, as markdown image lines."""
    from l2t_jax.tools import metric_plots
    lines = []
    for r in rows:
        groups = {"same-batch meta loss": r["directories"]["same"],
                  "held-out meta loss": r["directories"]["held_out"]}
        if all(groups.values()):
            name = f"meta_grad_norm_epc{r['examples_per_class']}.png"
            metric_plots.plot_train_metric(groups, "train/meta_grad_norm",
                                           os.path.join(out, name), "meta-gradient norm",
                                           log_y=True)
            lines.append(f"![meta-gradient norm, {r['examples_per_class']} per class]({name})")
    return lines


def draw_objectives(config, records: list[dict], rows: list[dict], out: str) -> list[str]:
    """The meta-gradient norm over training per source at its smallest and largest budget:
    the paper's same-batch L2T-ww (main grid) against each objective, as markdown image
    lines."""
    from l2t_jax.tools import metric_plots
    lines = []
    for source in config.sources:
        budgets = sorted({r["examples_per_class"] for r in rows if r["source"] == source})
        for k in sorted({budgets[0], budgets[-1]} if budgets else ()):
            groups = {f"{label(PROBE)}, main grid": [
                r["directory"] for r in select(records, grid="main", source=source,
                                               entry=PROBE, examples_per_class=k)
                if r["result"] is not None]}
            groups.update({objective_label(r["objective"]): r["directories"] for r in rows
                           if (r["source"], r["examples_per_class"]) == (source, k)})
            groups = {name: dirs for name, dirs in groups.items() if dirs}
            if len(groups) > 1:
                name = f"meta_grad_norm_{source}_epc{k}.png"
                metric_plots.plot_train_metric(groups, "train/meta_grad_norm",
                                               os.path.join(out, name), "meta-gradient norm",
                                               log_y=True)
                lines.append(f"![meta-gradient norm, {source}, {k} per class]({name})")
    return lines


# --------------------------------------------------------------------------- the report
def write_report(config, records: list[dict], out: str) -> str:
    """Writes ``out/``: study.md (a section per grid of ``config.grids``), main.csv,
    paired.csv and the pictures, from ``records``
    (:func:`l2t_jax.tools.study.load_records`). Returns study.md's path."""
    os.makedirs(out, exist_ok=True)
    lines = header_lines(config, records)
    if "recipe" in config.grids:
        lines += recipe_lines(config, recipe_rows(config, records),
                              recipe_mean_val(config, records))
    if "main" in config.grids:
        rows, paired = main_rows(config, records), paired_rows(config, records)
        lines += main_lines(config, records, rows, paired)
        write_csv(os.path.join(out, "main.csv"), main_csv_rows(rows))
        write_csv(os.path.join(out, "paired.csv"), paired_csv_rows(paired))
        lines += draw_main(config, records, out)
    if "meta_batch" in config.grids:
        rows = meta_batch_rows(config, records)
        lines += meta_batch_lines(config, rows, draw_meta_batch(rows, out))
    if "every_k" in config.grids:
        lines += every_k_lines(config, records, every_k_rows(config, records))
    if "sensitivity" in config.grids:
        lines += sensitivity_lines(config, sensitivity_rows(config, records))
    if "meta_screen" in config.grids:
        lines += screen_lines(config, screen_rows(config, records))
    if "meta_objective" in config.grids:
        rows = objective_rows(config, records)
        lines += objective_lines(config, rows, draw_objectives(config, records, rows, out))
    path = os.path.join(out, "study.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    runs = unique(records)
    logger.info("study report: %s (%d of %d runs)", path,
                sum(r["result"] is not None for r in runs), len(runs))
    return path
