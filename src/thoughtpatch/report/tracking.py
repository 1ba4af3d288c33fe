"""Weights & Biases logging with the seed's project and key names; the same numbers as
results.jsonl. Offline unless a key is configured; `disabled` on request."""

from __future__ import annotations

import math
import os
from pathlib import Path

PROJECT = "cot-exploration"
# results.jsonl column → the seed's metric name
NAMES = {"kl": "kl_div", "kl_to_clean": "kl_to_clean", "answer_logit_diff": "answer_logit_diff", "logprob_diff": "logprob_diff", "recovered": "recovered", "flip": "flip", "away": "away"}
ACT_NAMES = {"cos_clean": "activation_sim_clean", "cos_corrupted": "activation_sim_corrupted", "norm": "activation_norm"}


def default_mode() -> str:
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def _cell(row: dict) -> str:
    if row["experiment"] == "position":
        return f"layer_{row['layer']}/pos_{row['thought']}"
    if row["experiment"] == "iterative":
        return f"layer_{row['layer']}/iter_{row['iteration']}"
    return f"layer_{row['layer']}/all_pos"


def _num(v):
    return float(v) if not (isinstance(v, float) and math.isnan(v)) else None


class Tracker:
    def __init__(self, mode: str | None, out_dir: Path, config: dict, name: str):
        self.mode = mode or default_mode()
        self.run = None
        if self.mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.run = wandb.init(project=PROJECT, mode=self.mode, dir=str(out_dir), config=config, name=name, reinit="finish_previous")

    def log_pair(self, rows: list[dict]) -> None:
        if self.run is None:
            return
        data = {}
        for r in rows:
            prefix = f"pair_{r['pair_id']}/{_cell(r)}"
            for col, name in (NAMES | ACT_NAMES).items():
                if col in r and _num(r[col]) is not None:
                    data[f"{prefix}/{name}"] = _num(r[col])
        self.run.log(data)

    def log_summary(self, experiment: str, cells: list[dict]) -> None:
        if self.run is None:
            return
        data = {}
        for c in cells:
            cell = _cell({"experiment": experiment, **c})
            m = c["metrics"]
            for col, key in (("kl", "mean_kl"), ("answer_logit_diff", "mean_logit_diff"), ("logprob_diff", "mean_logprob_diff"), ("flip", "flip_rate"), ("cos_clean", "mean_activation_sim_clean")):
                if col in m and m[col]["mean"] is not None:
                    data[f"aggregate/{cell}/{key}"] = m[col]["mean"]
            if m["recovered"]["mean"] is not None:
                data[f"aggregate/{cell}/recovered"] = m["recovered"]["mean"]
        self.run.log(data)

    def finish(self) -> str | None:
        if self.run is None:
            return None
        d = self.run.dir
        self.run.finish()
        return d
