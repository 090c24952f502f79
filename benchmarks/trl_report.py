"""The TRL comparison's report: what differs between the sides (`NOTES`) and the markdown table.

Kept apart from `benchmarks/trl_compare.py`, which runs the sides; `markdown(result)` reads only the
result dict that `trl_compare.run` returns (or its saved JSON).
"""

from __future__ import annotations

from typing import Any

__all__ = ["EARLY_ITERATIONS", "NOTES", "markdown"]

EARLY_ITERATIONS = 20  # iterations after warm-up that "s/iteration, early" takes the median of

NOTES = [
    "RLOOTrainer optimises our objective: reward = RM score - beta * sum_t (log pi - log pi_ref) (k1, summed "
    "over the response, as our env), leave-one-out baseline over the k samples, no advantage whitening, loss "
    "-mean_seq(ratio * A) with a sequence ratio that is 1 on the single on-policy step, so its gradient is our "
    "REINFORCE gradient (token_mean false).",
    "RLOOTrainer runs one more policy forward than ours per iteration: after generating it recomputes log pi of "
    "the samples (for the KL); our sampler keeps the log-probs it sampled with.",
    "GRPOTrainer cannot put the KL in the reward: it adds beta * k3(pi, pi_ref) per token to the loss (with its "
    "default importance-ratio bias correction). Its advantage is r - mean of the group, itself included, i.e. "
    "(k-1)/k of the leave-one-out advantage. We set scale_rewards='none' and loss_type='dr_grpo' (token sum / "
    "(B * max_completion_length), the sequence-sum loss up to a constant): the closest GRPO gets to ours; its "
    "defaults (group-std scaling, 'dapo' token mean) are further off. Its reward is the RM score alone.",
    "TRL's log-prob forwards pass no position ids, while generate() derives them from the attention mask: the "
    "left-padded prompts (1 to 4 tokens here) sit up to 3 positions apart between sampling and training. That "
    "is TRL as shipped; we do not patch it.",
    "Our env also computes the gold reward of every training batch for logging; TRL does not. Its cost is in "
    "our s/iteration and shown in our breakdown (gold_logging_s).",
    "The reward model's head reads pi_ref's log-prob statistics. Our env hands it the reference forward it runs "
    "for the KL anyway (one pi_ref forward per batch); TRL calls the same reward model's score() on the decoded "
    "text, which runs the reward model's own frozen copy of pi_ref. The scores are the same (tested to 1e-4); "
    "the saved forward is one of our speed fixes, not a different reward.",
    "Prompts: ours draws 16 distinct prompts per iteration at random, TRL's RepeatSampler walks shuffled "
    "epochs of the 256 prompts; the same prompt distribution.",
    "Both: AdamW (betas 0.9/0.999, eps 1e-8, no weight decay), gradient-norm clip 1.0, constant lr (TRL: "
    "lr_scheduler_type='constant'; its default linear decay would depend on max_steps). TRL: no gradient "
    "checkpointing, bf16/fp16 off, use_vllm False, no eval, no saving during training, report_to none, "
    "dataloader workers 0, its default logging every 10 steps (included in its time).",
    "An iteration is timed from the end of the previous one to the end of its update (generation + scoring + "
    "update + each trainer's own bookkeeping); s/iteration is the median after the warm-up iterations. The "
    "budget counts training only (model loading and start-up excluded) and is checked after each iteration, "
    "so each side overshoots it by less than one iteration. The three sides run one after another on the same "
    "machine; a shared machine's load shifts all of them.",
]


def markdown(result: dict[str, Any]) -> str:
    """A small table: s/iteration, its ratio to ours, iterations and gold/proxy/KL after the same budget."""
    s = result["settings"]
    ours, ours_early = result["ours"]["s_per_iter"], result["ours"]["early_s_per_iter"]
    lines = [
        f"TRL {result['trl_version']} against ours, {s['prompts_per_batch']} prompts x {s['k']} samples = "
        f"{s['batch']} sequences, {s['max_new_tokens']} new tokens, beta {s['beta']:g}, lr {s['lr']:g}, "
        f"fp32, {s['budget_s']:g} s of training each; gold on {s['eval_episodes']} held-out episodes.",
        "",
        f"| | s / iteration, iterations {s['warmup'] + 1}-{s['warmup'] + EARLY_ITERATIONS} | x ours | "
        "s / iteration, whole budget | x ours | iterations | gold | proxy (RM) | KL | length |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(label: str, side: dict[str, Any] | None, e: dict[str, float]) -> str:
        timing = (
            f"{side['early_s_per_iter']:.3f} | {side['early_s_per_iter'] / ours_early:.2f}x | "
            f"{side['s_per_iter']:.3f} | {side['s_per_iter'] / ours:.2f}x | {side['iterations']}"
            if side
            else "- | - | - | - | -"
        )
        return (
            f"| {label} | {timing} | {e['gold_score']:.3f} | {e['rm_score']:.3f} | {e['kl']:.2f} | "
            f"{e['length']:.1f} |"
        )

    lines.append(row("pi_ref (start)", None, result["pi_ref"]["eval"]))
    for key, label in (
        ("ours", "ours: REINFORCE + RLOO baseline"),
        ("trl_rloo", "TRL RLOOTrainer"),
        ("trl_grpo", "TRL GRPOTrainer"),
    ):
        lines.append(row(label, result[key], result[key]["eval"]))
    parts = ", ".join(f"{k} {v:.3f}" for k, v in result["ours"]["breakdown"].items())
    lines += ["", f"Our iteration (median s): {parts}."]
    for key in ("trl_rloo", "trl_grpo"):
        parts = ", ".join(f"{k} {v:.3f}" for k, v in result[key]["breakdown"].items())
        lines.append(f"TRL {result[key]['trainer']} (median s): {parts}.")
    return "\n".join(lines) + "\n"
