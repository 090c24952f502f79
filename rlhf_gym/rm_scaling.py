"""`rlhf-gym rm-scaling`: how a reward model's held-out accuracy grows with its training pairs and its size.

    rlhf-gym rm-scaling --run-dir runs/rm-scaling [--quick] [model=runs/sft/sft] 'bodies=[tiny,small]'

Labels pairs once from pi_ref (the label stage's `label_pairs`: the largest count needed plus a held-out
set), then trains one reward model per (number of pairs, body size) on the first N pairs (a prefix of
randomly ordered pairs: each training set contains the smaller ones) and scores it on the same held-out
pairs. For each it reports

* `accuracy`: the share of held-out pairs ordered as the labeller did, and `accuracy_decided` on the pairs
  whose gold scores differ, the number to hold against `label_ceiling`: the share of those labels that
  agree with the gold order, which no reward model beats on average (`rlhf_gym.label`);
* `gold_agreement`: the share of those pairs it orders as the gold reward does;
* `spearman`: Spearman's rank correlation of its scores and the gold reward over every held-out response
  (both of each pair: fresh samples of pi_ref it never trained on), the gold order beyond pairs.

Gao et al. 2022 (https://arxiv.org/abs/2210.10760, fig. 5 and 7) measure the proxy's validation loss and
over-optimisation the same way, over data size and reward model size. Writes, into the run folder,
`pairs.jsonl` and `label_report.json` (the labelled pairs), `rm_scaling.csv` (a row per cell, appended as
it finishes, so an interrupted run resumes with the cells left), `rm_scaling.md` (the tables),
`rm_scaling.png` (accuracy and Spearman against pairs, a line per size, the ceiling as a horizontal line),
`rm_scaling.json` (the summary) and `rm_scaling_config.yaml`; with `save_models`, each cell's reward model
under `models/<body>-<pairs>/`, ready for `env.reward_model=...`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from reward_models.data import load_pairs, write_pairs
from reward_models.loading import body_shape
from reward_models.train import RewardTrainConfig, train_reward_model
from rlhf_base.config import config_to_dict, save_config
from rlhf_base.io import atomic_path, atomic_write
from rlhf_base.ranges import Range, check_ranges
from rlhf_gym.label import LabelConfig, label_pairs

__all__ = ["COLUMNS", "QUICK_OVERRIDES", "RMScalingConfig", "rank_correlation", "run_rm_scaling"]

COLUMNS = (
    "body",
    "num_pairs",
    "parameters",
    "accuracy",
    "accuracy_decided",
    "label_ceiling",
    "gold_agreement",
    "spearman",
    "eval_loss",
    "train_loss",
    "seconds",
)
"""`rm_scaling.csv`'s columns: the cell, its trainable parameters, the held-out metrics, the time it took."""

QUICK_OVERRIDES = (
    "pair_counts=[250,500,1000]",
    "bodies=[tiny,small]",
    "eval_pairs=500",
    "reward_model.epochs=2",
)
"""What `--quick` sets (before the command line's own overrides): a grid a CPU runs in a few minutes."""


@dataclass
class RMScalingConfig:
    """The grid and what each cell trains on.

    The defaults are the full study: 84 min on 2 CPU cores, mostly the base body. `--quick` takes minutes.
    """

    RANGES: ClassVar[dict[str, Range]] = {
        "pair_counts": Range(ge=2),  # RewardTrainConfig.num_pairs of each cell
        "eval_pairs": Range(ge=2),
    }

    model: str | None = (
        None  # pi_ref: whose samples are labelled and whose log-probs the heads read; None: tiny-reviews
    )
    pair_counts: list[int] = field(
        default_factory=lambda: [1000, 2000, 4000, 8000, 16000, 32000]
    )  # training pairs per cell: the first N of the labelled pairs
    bodies: list[str] = field(
        default_factory=lambda: ["tiny", "small", "base"]
    )  # reward model bodies: RewardTrainConfig.body values ("pretrained", a size, "LxE")
    eval_pairs: int = 2000  # held-out labelled pairs, one set for every cell
    label: LabelConfig = field(default_factory=LabelConfig)  # the labeller (tau, task, seed, ...); its
    # num_pairs (max(pair_counts) + eval_pairs) and model (the one above) are set here
    reward_model: RewardTrainConfig = field(default_factory=RewardTrainConfig)  # each cell's recipe; its
    # num_pairs and body are set per cell, pairs and eval_fraction unused (the held-out set is given);
    # logprob_model defaults to `model` (as the pipeline's)
    save_models: bool = True  # keep each cell's reward model under models/<body>-<pairs>/
    device: str = "cpu"  # labelling and training: "cpu", "cuda", "auto"

    def __post_init__(self) -> None:
        check_ranges(self)
        if not self.pair_counts:
            raise ValueError("pair_counts must name at least one count of training pairs")
        if not self.bodies:
            raise ValueError("bodies must name at least one body size")
        for body in self.bodies:
            body_shape(body)  # an unknown size fails now, not hours in
        if self.reward_model.ensemble_size != 1:
            raise ValueError("rm-scaling trains single reward models: reward_model.ensemble_size must be 1")

    @property
    def pairs_needed(self) -> int:
        """How many pairs are labelled: the largest training set plus the held-out set."""
        return max(self.pair_counts) + self.eval_pairs


# --------------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------------
def _average_ranks(values: np.ndarray) -> np.ndarray:
    """0-based ranks of `values`, ties sharing the mean of their ranks (so a tie of two at 3 and 4 is 3.5)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + ends - 1) / 2.0)[inverse]


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: the Pearson correlation of the two samples' average ranks; NaN if either is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of one length, got {x.shape} and {y.shape}")
    rx, ry = _average_ranks(x), _average_ranks(y)
    if len(x) < 2 or rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def _fingerprint(config: RMScalingConfig) -> dict[str, Any]:
    """What decides the cells' results, as JSON reads it back: the config less the device (a resumed run
    may move to another)."""
    data = config_to_dict(config)
    data.pop("device")
    return json.loads(json.dumps(data, default=str))


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: (v if k == "body" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def _append_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: row[k] for k in COLUMNS})


def _label(config: RMScalingConfig, run_dir: Path, resume: bool, progress: bool) -> tuple[list, dict]:
    """The labelled pairs and the labeller's report, reused when a resumed run has them."""
    pairs_path, report_path = run_dir / "pairs.jsonl", run_dir / "label_report.json"
    if resume and pairs_path.is_file() and report_path.is_file():
        return load_pairs(pairs_path), json.loads(report_path.read_text())
    label_config = dataclasses.replace(config.label, num_pairs=config.pairs_needed, model=config.model)
    pairs, report = label_pairs(label_config, device=config.device, progress=progress)
    write_pairs(pairs, pairs_path)
    atomic_write(report_path, json.dumps(report, indent=2, default=float) + "\n")
    return pairs, report


def _cell(
    config: RMScalingConfig,
    body: str,
    num_pairs: int,
    pool: list[dict[str, Any]],
    held_out: list[dict[str, Any]],
    run_dir: Path,
    progress: bool,
) -> dict[str, Any]:
    """Train one reward model on the first `num_pairs` of `pool`; its row of `COLUMNS`."""
    train_config = dataclasses.replace(config.reward_model, body=body, num_pairs=num_pairs)
    if train_config.logprob_features is not False and train_config.logprob_model is None:
        train_config = dataclasses.replace(train_config, logprob_model=config.model)  # pi_ref's log-probs
    model, metrics = train_reward_model(
        pool, train_config, eval_pairs=held_out, device=config.device, progress=progress
    )
    prompts = [p["prompt"] for p in held_out] * 2
    responses = [p["chosen"] for p in held_out] + [p["rejected"] for p in held_out]
    gold = [p["gold_chosen"] for p in held_out] + [p["gold_rejected"] for p in held_out]
    scores = model.score(prompts, responses, train_config.eval_batch_size).numpy()
    if config.save_models:
        model.save(run_dir / "models" / f"{body}-{num_pairs}")
    return {
        "body": body,
        "num_pairs": num_pairs,
        "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "accuracy": metrics["eval_accuracy"],  # the last epoch's evaluation on `held_out`
        "accuracy_decided": metrics.get("eval_accuracy_decided", math.nan),
        "label_ceiling": metrics.get("eval_label_ceiling", math.nan),
        "gold_agreement": metrics.get("eval_gold_agreement", math.nan),
        "spearman": rank_correlation(scores, gold),
        "eval_loss": metrics["eval_loss"],
        "train_loss": metrics["train_loss"],
        "seconds": metrics["seconds"],
    }


# --------------------------------------------------------------------------------------------------------
# The table and the plot
# --------------------------------------------------------------------------------------------------------
def _parameters(count: float) -> str:
    return f"{count / 1e6:.2f}M" if count >= 1e5 else f"{count / 1e3:.0f}k"


def markdown_table(rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> str:
    """Two tables, body x pairs: held-out accuracy on gold-decided pairs, then Spearman's rho with gold."""
    bodies = list(dict.fromkeys(r["body"] for r in rows))
    counts = sorted({int(r["num_pairs"]) for r in rows})
    cell = {(r["body"], int(r["num_pairs"])): r for r in rows}
    head = "| body (parameters) | " + " | ".join(f"{n:,}" for n in counts) + " |"
    rule = "|---|" + "---:|" * len(counts)

    def table(key: str) -> list[str]:
        lines = [head, rule]
        for body in bodies:
            some = next(r for r in rows if r["body"] == body)
            values = [cell.get((body, n), {}).get(key, math.nan) for n in counts]
            shown = " | ".join("" if math.isnan(v) else f"{v:.3f}" for v in values)
            lines.append(f"| {body} ({_parameters(some['parameters'])}) | {shown} |")
        return lines

    text = [
        "# Reward model scaling: held-out accuracy against the labeller's ceiling",
        "",
        f"pi_ref: {summary['model']}; labeller tau {summary['tau']}; {summary['eval_pairs']:,} held-out pairs "
        f"({summary['decided_pairs']:,} with a gold order); labeller ceiling on them "
        f"**{summary['label_ceiling']:.3f}** (on all {summary['labelled_pairs']:,} labels: "
        f"{summary['ceiling_all']:.3f}); this run took {summary['seconds']:.0f} s.",
        "",
        "Accuracy on the held-out pairs whose gold scores differ (`accuracy_decided`; the ceiling above is "
        "its best expected value):",
        "",
        *table("accuracy_decided"),
        "",
        "Agreement with the gold reward's order: Spearman's rho of the reward model's scores and the gold "
        f"reward over the {2 * summary['eval_pairs']:,} held-out responses (fresh pi_ref samples):",
        "",
        *table("spearman"),
        "",
    ]
    return "\n".join(text)


def plot(rows: Sequence[dict[str, Any]], ceiling: float, path: Path) -> Path:
    """Accuracy (gold-decided pairs) and Spearman's rho against pairs, a line per body, the ceiling dashed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    accuracy_ax, spearman_ax = fig.subplots(1, 2)
    for body in dict.fromkeys(r["body"] for r in rows):
        mine = sorted((r for r in rows if r["body"] == body), key=lambda r: r["num_pairs"])
        label = f"{body} ({_parameters(mine[0]['parameters'])})"
        x = [r["num_pairs"] for r in mine]
        accuracy_ax.plot(x, [r["accuracy_decided"] for r in mine], marker="o", label=label)
        spearman_ax.plot(x, [r["spearman"] for r in mine], marker="o", label=label)
    if math.isfinite(ceiling):
        accuracy_ax.axhline(ceiling, color="black", linestyle="--", label=f"labeller ceiling {ceiling:.3f}")
    accuracy_ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    accuracy_ax.set(ylabel="held-out accuracy (gold-decided pairs)", title="accuracy vs pairs")
    spearman_ax.set(ylabel="Spearman's rho with the gold reward", title="gold order vs pairs")
    counts = sorted({int(r["num_pairs"]) for r in rows})
    for ax in (accuracy_ax, spearman_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, labels=[f"{n:,}" for n in counts])
        ax.minorticks_off()
        ax.set_xlabel("training pairs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


# --------------------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------------------
def run_rm_scaling(
    config: RMScalingConfig | None = None, run_dir: str | Path = "runs/rm-scaling", progress: bool = True
) -> dict[str, Any]:
    """Label once, train a reward model per (body, pairs) cell, write the CSV, tables and plot.

    A run folder that holds this config's `rm_scaling_config.yaml` resumes: its labelled pairs are reused
    and its finished cells skipped; a different config starts it afresh.

    Returns:
        The summary (also `rm_scaling.json`): the labeller's ceilings, sizes, seconds, the rows, and the
        paths of `csv`, `table` and `plot`.
    """
    config = config or RMScalingConfig()
    start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    csv_path, state_path = run_dir / "rm_scaling.csv", run_dir / "rm_scaling_state.json"
    resume = state_path.is_file() and json.loads(state_path.read_text()) == _fingerprint(config)
    if not resume:
        csv_path.unlink(missing_ok=True)
    save_config(config, run_dir / "rm_scaling_config.yaml")
    pairs, report = _label(config, run_dir, resume, progress)
    atomic_write(state_path, json.dumps(_fingerprint(config), indent=2) + "\n")
    pool, held_out = pairs[: max(config.pair_counts)], pairs[-config.eval_pairs :]

    rows = _read_rows(csv_path)
    done = {(r["body"], int(r["num_pairs"])) for r in rows}
    cells = [(b, n) for b in config.bodies for n in sorted(config.pair_counts) if (b, n) not in done]
    for i, (body, num_pairs) in enumerate(cells, start=1):
        if progress:
            print(f"[rm-scaling {time.perf_counter() - start:6.0f}s] cell {i}/{len(cells)}: {body}, "
                  f"{num_pairs} pairs", flush=True)  # fmt: skip
        row = _cell(config, body, num_pairs, pool, held_out, run_dir, progress)
        _append_row(csv_path, row)
        rows.append(row)

    gold = np.array([p["gold_chosen"] - p["gold_rejected"] for p in held_out])
    summary = {
        "model": config.model or "tiny-reviews",
        "tau": config.label.tau,
        "labelled_pairs": len(pairs),
        "eval_pairs": len(held_out),
        "decided_pairs": int((gold != 0).sum()),
        "label_ceiling": float((gold[gold != 0] > 0).mean()) if (gold != 0).any() else math.nan,
        "ceiling_all": report["ceiling"],
        "expected_ceiling_all": report["expected_ceiling"],
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    table = run_dir / "rm_scaling.md"
    atomic_write(table, markdown_table(rows, summary))
    png = plot(rows, summary["label_ceiling"], run_dir / "rm_scaling.png")
    summary.update(csv=str(csv_path), table=str(table), plot=str(png))
    atomic_write(run_dir / "rm_scaling.json", json.dumps(summary, indent=2, default=float) + "\n")
    return summary
