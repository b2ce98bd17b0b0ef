"""What do non-i.i.d. minibatches do to BN?

Design (conf/study/noniid.yaml, STUDIES.md): an optimization batch of 160 made of contiguous
groups, each group one BN normalization batch (ghost BN / batch renorm with
``norm.virtual_batch`` = the group), while the classes of the groups together cover every class
once per batch, so the gradient is class-balanced and only BN sees few classes (Ioffe's
multi-worker setting). Samplers on 10 classes: ``iid`` (i.i.d. batches, chunks of 32),
``pk2x16g5`` (5 groups of 2 classes x 16 images, chunks of 32), ``sorted16g10`` (10 one-class
groups of 16, chunks of 16). Norms: ``ghost_bn`` (BN per group), ``batch_renorm`` (Ioffe 2017,
r and d per group), ``gn`` (no batch statistics: the control that must train as well as under
i.i.d. batches). Every model is scored after every epoch under each eval mode: ``ema``;
``precise`` / ``precise_bvar`` (population statistics from an i.i.d. pass, pooled variance / mean
of per-chunk variances); ``precise_sampler`` / ``precise_sampler_bvar`` (the same from a pass
drawn by the training sampler); ``batch`` (statistics of i.i.d. test batches of 160, cut into the
training chunks) and ``batch_sampler`` (test batches with the training sampler's structure). The
training error with batch statistics is the train-mode accuracy of the last epoch.

Run::

    make study S=noniid ARGS="data=synthetic scale=smoke"                   # 27 runs
    make study S=noniid ARGS="data=fashion_mnist scale=small launcher=joblib"  # 27 runs, ~30 min
    make study S=noniid                                                     # CIFAR-10, 27 runs

Expected (Ioffe 2017, "Batch Renormalization"; Irpan 2017, "On the perils of batch norm"): BN
scored with its EMA statistics degrades under P x K groups, because it trained to normalize with
the statistics of a few classes, which population statistics do not match: the model fits the
batch structure (good on test batches with that structure, poor on single examples, i.e. with
any fixed statistics); GN is unaffected; batch renorm and precise (population) statistics recover
most of the i.i.d. accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from bnexp.analysis import generic as A
from bnexp.analysis.tables import collect_runs
from bnexp.analysis.study import Study, StudyData
from bnexp.analysis.verdicts import Shape, compare, compare_recovery, words
from bnexp.analysis.run_study import run_study

NORMS = ("ghost_bn", "batch_renorm", "gn")
BN = ("ghost_bn", "batch_renorm")  # the norms with batch statistics
MODES = ("ema", "precise", "precise_bvar", "precise_sampler", "precise_sampler_bvar", "batch",
         "batch_sampler")
STATS = "norm / eval mode"  # one bar or line per (norm, eval mode) pair
CONTROL = "gn / ema (control)"  # GN's one score, drawn as a bar beside each BN figure's modes
# the curves show the literature's contenders only (all pairs make 15 overlapping bands)
CURVES = ("ghost_bn / ema", "ghost_bn / precise", "ghost_bn / batch_sampler",
          "batch_renorm / ema", "gn / ema")


def by_stats(df: pd.DataFrame, metric: str = "test_acc") -> pd.DataFrame:
    """Rows per (run [, epoch], eval mode) with ``metric`` and a ``STATS`` label ``norm / mode``.
    Modes a model does not have (GN: all but ema) and unfinished runs are dropped; a diverged run
    stays as one ema row (figures mark it), since which modes it would have had is unknown."""
    long = A.eval_modes_long(df, metric)
    diverged = (long["status"] == "diverged") & (long["eval_mode"] == "ema")
    long = long[long["eval_mode"].isin(MODES) & (long[metric].notna() | diverged)]
    return long.assign(**{STATS: long["norm"] + " / " + long["eval_mode"]})


def samplers(runs: pd.DataFrame) -> tuple[list, list]:
    """(non-i.i.d. samplers, all samplers) in the order iid, pk..., sorted..., others."""
    names = sorted(runs["sampler"].dropna().unique(),
                   key=lambda s: (s != "iid", not s.startswith("pk"), s))
    return [s for s in names if s != "iid"], names


def with_train_mode_acc(runs: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """Adds ``train_acc.train_mode``: the running accuracy of each run's last epoch, measured
    with the batch statistics of its own (non-i.i.d.) training batches. Near chance there means
    the model did not train; high there but low on test means the test statistics failed."""
    if not len(curves) or "train_acc" not in curves:
        return runs
    last = curves.sort_values("epoch").groupby("run")["train_acc"].last()
    return runs.assign(**{"train_acc.train_mode": runs["run"].map(last)})


def chunk_sizes(runs: pd.DataFrame) -> dict:
    """``{sampler: normalization batch}`` of the BN arms (``norm.virtual_batch``)."""
    bn = runs[runs["norm"].isin(BN)]
    return {s: int(v) for s, v in bn.groupby("sampler")["norm.virtual_batch"].first().items()}


# ----------------------------------------------------------------------------- statements
def statements(long: pd.DataFrame, metric: str = "test_acc") -> list[str]:
    """Per BN norm: EMA under each non-i.i.d. sampler against i.i.d.; then, under each, what
    recovers (precise statistics, batch renorm) and how much of the loss, and the structured
    test batches against single-example (EMA) scoring; GN against i.i.d."""
    summary = A.summarize(long, [STATS, "sampler"], [metric])
    have = set(summary[STATS])
    noniid, names = samplers(long)
    out = []
    for label in ("ghost_bn / ema", "batch_renorm / ema", "gn / ema"):
        if label in have and "iid" in names:
            out += [f"{label}, sampler {s} vs iid: " + A.compare_statement(
                summary, metric, "sampler", s, "iid", at={STATS: label}) for s in noniid]
    for s in noniid:
        for rescue in ("ghost_bn / precise", "ghost_bn / precise_sampler",
                       "ghost_bn / precise_sampler_bvar", "ghost_bn / batch_sampler"):
            if {rescue, "ghost_bn / ema"} <= have:  # the same models: paired by seed
                out.append(A.paired_statement(long, metric, STATS, rescue, "ghost_bn / ema",
                                              at={"sampler": s}))
        if {"batch_renorm / ema", "ghost_bn / ema"} <= have:
            out.append(A.compare_statement(summary, metric, STATS, "batch_renorm / ema",
                                           "ghost_bn / ema", at={"sampler": s}))
        out += [t for t in [recovered_share(summary, s, r, metric)
                            for r in ("ghost_bn / precise", "batch_renorm / ema")] if t]
    return out


def recovered_share(summary: pd.DataFrame, sampler: str, rescue: str, metric: str) -> str:
    """"<rescue> recovers X% of the accuracy ghost_bn / ema lost under <sampler>" (means)."""
    def mean(label, s):
        row = A.select(summary, {STATS: label, "sampler": s})
        return float(row[f"{metric}.mean"].iloc[0]) if len(row) else float("nan")

    iid, lost, got = mean("ghost_bn / ema", "iid"), mean("ghost_bn / ema", sampler), mean(rescue, sampler)
    if not iid - lost > 0.01:  # less than a point lost: no share to speak of
        return ""
    return (f"under {sampler}, {rescue} recovers {100 * (got - lost) / (iid - lost):.0f}% of the "
            f"{100 * (iid - lost):.1f} points that ghost_bn / ema lost against iid (means)")


def diagnosis(runs: pd.DataFrame) -> str:
    """Per BN norm and non-i.i.d. sampler: train-mode accuracy, ema - precise, the EMA /
    population variance ratio and, for the P x K pass, the mean per-group variance / pooled one."""
    cols = ["train_acc.train_mode", "test_acc.ema", "test_acc.precise", "precise.ema_var_ratio",
            "precise_sampler.var_ratio"]
    bn = runs[runs["norm"].isin(BN) & (runs["status"] == "ok")]
    if bn.empty or not set(cols) <= set(bn):
        return ""
    means = bn.groupby(["norm", "sampler"])[cols].mean()
    parts = [f"{n} / {s}: train-mode accuracy {100 * m.iloc[0]:.0f}%, ema - precise "
             f"{100 * (m.iloc[1] - m.iloc[2]):+.1f} points, EMA / population variance "
             f"{m.iloc[3]:.2f}, per-group / pooled variance of the sampler pass {m.iloc[4]:.2f}"
             for (n, s), m in means.iterrows()]
    return ("Mean over seeds: " + "; ".join(parts) + ". Under P x K groups the per-group "
            "variance misses the spread of the group means, so the EMA (fed per-group variances) "
            "and `precise_sampler_bvar` underestimate the population variance (ratio < 1); a "
            "train-mode accuracy near chance means the model did not train on those batches, "
            "which no choice of test statistics repairs.")


def leakage(runs: pd.DataFrame) -> str:
    """``batch_sampler`` groups test images by their labels, as the training sampler groups
    training images: a score above the i.i.d. model's says the model reads the class from its
    group's statistics, an accuracy that needs the test labels to form the batches."""
    col, bn = "test_acc.batch_sampler", runs[(runs["norm"] == "ghost_bn") & (runs["status"] == "ok")]
    if col not in bn or "test_acc.ema" not in bn:
        return ""
    iid = bn.loc[bn["sampler"] == "iid", "test_acc.ema"].mean()
    above = {s: v for s, v in bn.groupby("sampler")[col].mean().items() if s != "iid" and v > iid}
    if not above or pd.isna(iid):
        return ""
    text = ", ".join(f"{100 * v:.1f}% under {s}" for s, v in above.items())
    return (f"ghost_bn scored on test batches with the training sampler's structure reaches {text}, "
            f"above the {100 * iid:.1f}% of i.i.d.-trained BN: those batches are formed from the "
            "test labels (one or two classes per group), and the model reads the class off its "
            "group's statistics. It measures how much the model fits the batch structure, not an "
            "accuracy one can have without the labels. ")


def confound(runs: pd.DataFrame) -> str:
    sizes = chunk_sizes(runs)
    if len(set(sizes.values())) < 2:
        return ""
    text = ", ".join(f"{s} {v}" for s, v in sizes.items())
    return (f"Normalization batch per sampler: {text}. When each of 10 classes appears once per "
            "batch of 160, a one-class group holds 16 images and a two-class group 32, so "
            "the sorted arm against iid also halves the normalization batch (32 -> 16), a second "
            "cause of noisier statistics next to the one-class groups; batch_size's "
            "ghost_bn16 vs ghost_bn32 measures that effect alone.")


GN_SEEDS = "-gn_seeds"  # sibling folder: GN under the two grouped samplers at more seeds


def gn_sorting(d: StudyData) -> str:
    """Whether GN trains slower under sorted16g10 than under pk2x16g5: for GN the two samplers are
    one training process up to floating-point summation order (see ``SAME_PROCESS``), so a gap
    should be the trajectories' sensitivity to rounding, of either sign; a paired interval that
    excludes 0 says it is not. Measured over the study's seeds and, when run, more in
    ``<study_dir>-gn_seeds`` (pooled only where scored on the same test set): per sampler the
    runs whose last-epoch train-mode accuracy reached 99%, and the paired test-accuracy
    difference; then, when run, the same pair at precision=fp32 (``<study_dir>-gn_fp32``), which
    tells reduced-precision sums from the rest (``fp32_sentence``)."""
    runs = _gn_pairs(d)
    if runs is None:
        return ""
    gap = paired_gap(runs)
    fp32 = _gn_fp32_runs(d)
    checked = fp32 is not None and fp32["sampler"].nunique() == 2
    reading = (f" The interval excludes 0 and {gap.agree} of {gap.n} seeds go its way: a systematic "
               "effect of the order inside the batch, which a per-sample norm should not have and "
               "rounding differences of either sign would not give."
               + ("" if checked else " Not explained yet; one candidate is the reduced-precision "
                  "(bf16) sums of the weight gradient over same-class blocks, to be checked by the "
                  "same pair at precision=fp32.")
               if gap.excludes_0 else " The interval holds 0: consistent with the rounding explanation.")
    text = (f" **GN under class-sorted groups.** {SAME_PROCESS} Measured over {gap.n} seeds "
            f"({runs.attrs['where']}; precision {_precision(runs)}): {gap.counts}; test accuracy "
            f"{GN_PAIR[1]} - {GN_PAIR[0]} {gap.mean:+.1f} points [{gap.lo:+.1f}, {gap.hi:+.1f}] "
            "(paired by seed, 95% t-interval)." + reading)
    return text + (fp32_sentence(runs, fp32) if checked else "")


@dataclass(frozen=True)
class Gap:
    """Test accuracy sorted16g10 - pk2x16g5 in points, paired by seed (``by_seed``), its mean and
    95% t-interval, how many seeds share the mean's sign, and per sampler how many runs reached
    99% train-mode accuracy in the last epoch (``counts``, in words)."""
    by_seed: pd.Series
    counts: str

    @property
    def n(self) -> int:
        return len(self.by_seed)

    @property
    def mean(self) -> float:
        return float(self.by_seed.mean())

    @property
    def half(self) -> float:
        n = self.n
        return float(stats.t.ppf(0.975, n - 1) * self.by_seed.std(ddof=1) / n ** 0.5) if n > 1 else float("nan")

    @property
    def lo(self) -> float:
        return self.mean - self.half

    @property
    def hi(self) -> float:
        return self.mean + self.half

    @property
    def excludes_0(self) -> bool:
        return self.n > 1 and (self.lo > 0 or self.hi < 0)

    @property
    def agree(self) -> int:
        return int((self.by_seed.apply(_sign) == _sign(self.mean)).sum())


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def paired_gap(runs: pd.DataFrame) -> Gap:
    """The ``Gap`` of GN's runs under the two samplers (seeds with both only)."""
    fit = runs.assign(fit=runs["train_acc.train_mode"] >= 0.99).groupby("sampler")["fit"].agg(["sum", "count"])
    seeds = runs.pivot_table(index="seed", columns="sampler", values="test_acc").reindex(columns=GN_PAIR).dropna()
    counts = "; ".join(f"{s}: {int(fit.loc[s, 'sum'])} of {int(fit.loc[s, 'count'])} runs at >= 99% train-mode "
                       "accuracy in the last epoch" for s in GN_PAIR if s in fit.index)
    return Gap(100 * (seeds[GN_PAIR[1]] - seeds[GN_PAIR[0]]), counts)


def fp32_sentence(low: pd.DataFrame, fp32: pd.DataFrame) -> str:
    """The same pair at precision=fp32 beside the reduced-precision runs ``low``, and what the two
    say about the bf16 explanation: the fp32 gap on its own, and its change from the low-precision
    gap over the seeds both have (paired). "Explained" needs the low-precision gap to exclude 0,
    the fp32 one to hold 0 and the change to exclude 0 towards 0; a gap that stays with its sign
    rules precision out; anything else is said as it is."""
    if "precision" in fp32 and set(fp32["precision"].dropna()) - {"fp32"}:
        return (f" The `{GN_FP32.lstrip('-')}` runs did not all train at fp32 "
                f"({', '.join(sorted(map(str, fp32['precision'].dropna().unique())))}): not read.")
    base, check = paired_gap(low), paired_gap(fp32)
    if check.n < 2:
        return f" The same pair at precision=fp32 has {check.n} seed(s) with both samplers: too few to read."
    both = check.by_seed.index.intersection(base.by_seed.index)
    change = Gap(check.by_seed[both] - base.by_seed[both], "")
    said = (f" The same pair at precision=fp32 (`{GN_FP32.lstrip('-')}`, {check.n} seeds): {check.counts}; "
            f"{GN_PAIR[1]} - {GN_PAIR[0]} {check.mean:+.1f} points [{check.lo:+.1f}, {check.hi:+.1f}], "
            f"{check.agree} of {check.n} seeds its way; fp32 minus {_precision(low)} on the {change.n} "
            f"seeds both have: {change.mean:+.1f} points [{change.lo:+.1f}, {change.hi:+.1f}].")
    toward_0 = change.excludes_0 and (change.mean > 0) == (base.mean < 0)
    if base.excludes_0 and check.excludes_0 and (check.mean < 0) == (base.mean < 0):
        reading = ("the gap stays, with its sign, in fp32: reduced precision does not explain it; "
                   "something in the order of a batch still reaches GN's training")
    elif base.excludes_0 and not check.excludes_0 and toward_0:
        reading = ("the gap is gone in fp32 and shrank in every sense the seeds can show: the "
                   "reduced-precision sums explain it")
    elif base.excludes_0 and check.excludes_0:
        reading = "fp32 shows a gap of the other sign: neither rounding nor precision explains the pair"
    elif base.excludes_0:
        reading = ("fp32 shows no gap, but not one shown smaller than the reduced-precision one: "
                   "inconclusive (more seeds would tell)")
    elif check.excludes_0 and not change.excludes_0 and (check.mean < 0) == (base.mean < 0):
        reading = (f"the gap has the same sign at both precisions and does not change between them "
                   f"(the change holds 0); fp32's runs scatter less and show it, {_precision(low)}'s "
                   "hold it within their spread: reduced precision does not explain it, and it is "
                   f"small ({check.mean:+.1f} points at fp32, {base.mean:+.1f} at {_precision(low)}; "
                   f"with {check.n} seeds, {check.agree} of {check.n} its way is a sign test p of "
                   f"{_sign_p(check.agree, check.n):.2g})")
    elif check.excludes_0:
        reading = "fp32 shows a gap the reduced-precision runs do not: not explained"
    else:
        reading = "neither precision shows a gap: rounding, in both"
    return f"{said} So {reading}."


def _sign_p(agree: int, n: int) -> float:
    """Two-sided sign test: ``agree`` of ``n`` seeds on one side."""
    return float(stats.binomtest(agree, n, 0.5).pvalue)


def _precision(runs: pd.DataFrame) -> str:
    """The precision the runs trained at (the recorded, resolved ``precision``)."""
    if "precision" in runs and runs["precision"].notna().any():
        return "/".join(sorted(map(str, runs["precision"].dropna().unique())))
    return "as recorded"


GN_FP32 = "-gn_fp32"  # sibling folder: the GN pair at precision=fp32 (the bf16 explanation's check)


def _gn_fp32_runs(d: StudyData) -> pd.DataFrame | None:
    """GN's finished runs of the pair in ``<study_dir>-gn_fp32`` (None: not run). Produced by
    ``bnexp -m study=noniid data=fashion_mnist scale=small launcher=joblib norm=gn
    sampler=pk2x16g5,sorted16g10 seed=0,1,2,3,4 precision=fp32
    hydra.sweep.dir=results/noniid/fashion_mnist-small-gn_fp32``."""
    where = Path(str(d.study_dir) + GN_FP32) if d.study_dir else None
    if where is None or not where.is_dir():
        return None
    runs, curves = collect_runs(where)
    if runs.empty:
        return None
    runs = with_train_mode_acc(runs, curves)
    return runs[(runs["norm"] == "gn") & runs["sampler"].isin(GN_PAIR) & (runs["status"] == "ok")]


GN_PAIR = ("pk2x16g5", "sorted16g10")
SAME_PROCESS = ("For GN, sorted16g10 and pk2x16g5 are one training process up to floating-point "
                "summation order: with 10 classes in 10 slots of 16 every batch holds every class "
                "16 times, both samplers draw the same examples into the same step for a seed (the "
                "sampler's generator is keyed on the seed and epoch only), only the order inside "
                "the batch differs, and GN normalizes each sample on its own (no augmentation at "
                "this scale). If nothing else differs, a gap between the two runs of a seed is the "
                "trajectories' sensitivity to rounding at lr 0.1, of either sign.")


def _gn_pairs(d: StudyData) -> pd.DataFrame | None:
    """GN's finished runs under the two grouped samplers, the study's and those of the sibling
    ``-gn_seeds`` sweep (a seed's study run first), with ``attrs['where']``; None if either
    sampler has none."""
    gn = d.runs[(d.runs["norm"] == "gn") & d.runs["sampler"].isin(GN_PAIR) & (d.runs["status"] == "ok")]
    extra = Path(str(d.study_dir) + GN_SEEDS) if d.study_dir else None
    more = pd.DataFrame()
    if extra is not None and extra.is_dir():
        more, curves = collect_runs(extra)
        more = with_train_mode_acc(more, curves)
        more = more[(more["norm"] == "gn") & more["sampler"].isin(GN_PAIR) & (more["status"] == "ok")]
    skipped = ""
    if len(more) and "data.test_size" in more and "data.test_size" in gn:
        same = more["data.test_size"].fillna(-1).isin(set(gn["data.test_size"].fillna(-1)))
        if not same.all():
            skipped = f"; `{extra.name}`'s runs not pooled: scored on another test set"
        more = more[same]
    runs = pd.concat([gn, more], ignore_index=True).drop_duplicates(subset=["sampler", "seed"], keep="first")
    if runs["sampler"].nunique() < 2:
        return None
    added = runs["seed"].nunique() - gn["seed"].nunique()
    runs.attrs["where"] = (f"{gn['seed'].nunique()} of the study, {added} more in `{extra.name}`"
                           if added > 0 else "the study's") + skipped
    return runs


# ----------------------------------------------------------------------------- figures, table
def prepare(d: StudyData) -> StudyData:
    d.runs = with_train_mode_acc(d.runs, d.curves)
    d.extra["long"] = by_stats(d.runs)
    return d


def bars(long: pd.DataFrame, norm: str) -> Figure:
    """Test accuracy per sampler, one bar per eval mode of ``norm``, GN's ema as the control."""
    rows = long[long["norm"] == norm]
    gn = long[long[STATS] == "gn / ema"].assign(eval_mode=CONTROL)
    order = [m for m in MODES if m in set(rows["eval_mode"])] + ([CONTROL] if len(gn) else [])
    return A.plot_bars(pd.concat([rows, gn], ignore_index=True), "sampler", "test_acc",
                       "eval_mode", hue_order=order,
                       title=f"norm={norm}: final test accuracy (bars: mean, 95% CI; dots: runs)")


def figures(d: StudyData) -> dict:
    long = d.extra["long"]
    figs = {f"test_acc_by_sampler_and_eval_mode_{n}": bars(long, n)
            for n in BN if (long["norm"] == n).any()}
    _, names = samplers(d.runs)
    # x = epoch, not step: a sampler's steps per epoch differ between seeds (16-18 batches of 160
    # from a seed's 3,000 images), so per step each point would average a different subset of the
    # seeds (a zigzag with bands from one or two runs); every seed is scored at the same epochs
    for sampler in names if len(d.curves) else []:
        epochs = by_stats(d.curves[d.curves["sampler"] == sampler])
        epochs = epochs[epochs[STATS].isin(CURVES)]
        figs[f"test_acc_curves_{sampler}"] = A.plot_curves(
            epochs, "epoch", "test_acc", STATS, hue_order=[c for c in CURVES if c in set(epochs[STATS])],
            title=f"test accuracy, sampler={sampler} (mean, 95% CI)", legend_outside=True)
    return figs


def table(d: StudyData) -> pd.DataFrame:
    """Norm x sampler, samplers in the order iid, pk..., sorted..."""
    runs, by = d.runs, ["norm", "sampler"]
    metrics = [m for m in ("train_acc.train_mode", *(f"test_acc.{m}" for m in MODES),
                           "precise.ema_var_ratio", "precise_sampler.var_ratio") if m in runs]
    summary = A.summarize(runs, by, metrics)
    summary["sampler"] = pd.Categorical(summary["sampler"], samplers(runs)[1], ordered=True)
    summary["norm"] = pd.Categorical(summary["norm"], [n for n in NORMS if n in set(runs["norm"])])
    return A.format_summary(summary.sort_values(["norm", "sampler"]), by, metrics)


def notes(d: StudyData) -> str:
    return ("`batch` normalizes i.i.d. test batches and `batch_sampler` test batches drawn by "
            f"the training sampler, both of {int(d.runs['eval.batch_size'].iloc[0])} images cut "
            "into the training chunks; the precise passes use plain batch statistics per chunk "
            "(no renorm r, d). GN has no batch statistics: ema only. " + leakage(d.runs)
            + confound(d.runs) + " "
            + diagnosis(d.runs) + gn_sorting(d))


# ----------------------------------------------------------------------------- verdicts
def _names(*arms) -> tuple:
    return tuple(" ".join(words(w) for w in a.split(" / ")) if " / " in a else words(a) for a in arms)


def ema_degrades(d: StudyData):
    noniid, _ = samplers(d.runs)
    at = {STATS: "ghost_bn / ema"}
    parts = [compare(d.extra["long"], "test_acc", "sampler", s, "iid", at=at, want=-1, runs=d.runs,
                     names=(f"BN trained on {s} batches", "on i.i.d. batches")) for s in noniid]
    return parts[0].also(*parts[1:])


def gn_unaffected(d: StudyData):
    noniid, _ = samplers(d.runs)
    at = {STATS: "gn / ema"}
    parts = [compare(d.extra["long"], "test_acc", "sampler", s, "iid", at=at, want=0, margin=0.02, runs=d.runs,
                     names=(f"GN trained on {s} batches", "on i.i.d. batches")) for s in noniid]
    return parts[0].also(*parts[1:])


def by_seed(long: pd.DataFrame, stats: str, sampler: str) -> pd.Series:
    rows = long[(long[STATS] == stats) & (long["sampler"] == sampler)]
    return rows.groupby("seed")["test_acc"].mean()


def recovered(d: StudyData):
    """"Recover": per seed, the share of the accuracy BN with EMA statistics loses under the
    batch structure (against i.i.d. training) that precise statistics (the same weights, E)
    and batch renorm (another training) win back; "most" = at least half."""
    long, (noniid, _) = d.extra["long"], samplers(d.runs)
    base = by_seed(long, "ghost_bn / ema", "iid")
    parts = []
    for s in noniid:
        hurt, runs = by_seed(long, "ghost_bn / ema", s), d.runs[d.runs["sampler"] == s]
        parts += [compare_recovery(base, hurt, by_seed(long, "ghost_bn / precise", s), claim="E",
                                   name=f"share of the {s} loss precise statistics recover",
                                   runs=runs[runs["norm"] == "ghost_bn"]),
                  compare_recovery(base, hurt, by_seed(long, "batch_renorm / ema", s), claim="G",
                                   name=f"share of the {s} loss batch renorm recovers",
                                   runs=runs[runs["norm"] == "batch_renorm"])]
    return parts[0].also(*parts[1:])


def fits_the_structure(d: StudyData):
    """Structured test batches beat single-example scoring (ema) and i.i.d. test batches: the
    same weights (E), paired by seed."""
    long, (noniid, _) = d.extra["long"], samplers(d.runs)
    parts = [compare(long, "test_acc", STATS, "ghost_bn / batch_sampler", other, at={"sampler": s}, want=+1,
                     claim="E", runs=d.runs, names=_names("ghost_bn / batch_sampler", other))
             for s in noniid for other in ("ghost_bn / ema", "ghost_bn / batch")]
    return parts[0].also(*parts[1:])


SOURCE = "Ioffe 2017, Batch Renormalization; Irpan 2017"
STUDY = Study(
    "noniid", __doc__,
    shapes=[Shape("BN (ghost_bn) with EMA statistics degrades under P x K and class-sorted groups "
                  "against i.i.d. batches", SOURCE, ema_degrades, "G"),
            Shape("GN is unaffected by the batch structure (within +/- 2 points of iid)", SOURCE,
                  gn_unaffected, "G"),
            Shape("precise statistics and batch renorm recover accuracy over BN with EMA", SOURCE,
                  recovered, "E"),
            Shape("BN fits the batch structure: test batches with the training sampler's "
                  "structure (batch_sampler) score above single examples (ema) and i.i.d. test "
                  "batches", "Irpan 2017", fits_the_structure, "E")],
    prepare=prepare, figures=figures, table=table,
    comparisons=lambda d: statements(d.extra["long"]), notes=notes)


if __name__ == "__main__":
    run_study(STUDY)
