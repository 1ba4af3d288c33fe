"""Weights & Biases logging with the seed's project and key names; the same numbers as
results.jsonl. Offline unless a key is configured; `disabled` on request.

Keys: `pair_<id>/<cell>/<metric>` per pair and `aggregate/<cell>/<statistic>` per cell. The
resid grid keeps the seed's cells (`layer_2/pos_1`, `layer_2/iter_1`, `layer_2/all_pos`) so
that dashboards built on them keep working; another site puts its name first
(`attn/layer_2/pos_1`), the head site its head after the layer (`head/layer_2/head_1/pos_1`);
knockout is `knockout/<run>/layer_2/pos_1` (the run knocked out: clean or corrupted), causal
tracing `trace/layer_2/pos_1` (`trace/attn/...` off the resid grid). The mode is the run's
(W&B config), not part of a key."""

from __future__ import annotations

import math
import os
from pathlib import Path

PROJECT = "cot-exploration"
# results.jsonl column → the seed's metric name
NAMES = {
    "kl": "kl_div", "kl_to_clean": "kl_to_clean", "answer_logit_diff": "answer_logit_diff", "logprob_diff": "logprob_diff", "recovered": "recovered",
    "flip": "flip", "away": "away", "delta_logprob_diff": "delta_logprob_diff", "logprob_clean": "logprob_clean", "restored": "restored",
}
# summary statistic → aggregate key
AGGREGATES = {
    "kl": "mean_kl", "answer_logit_diff": "mean_logit_diff", "logprob_diff": "mean_logprob_diff", "flip": "flip_rate", "cos_clean": "mean_activation_sim_clean",
    "recovered": "recovered", "restored": "restored", "delta_logprob_diff": "mean_delta_logprob_diff", "logprob_clean": "mean_logprob_clean", "away": "away_rate",
}
ACT_NAMES = {"cos_clean": "activation_sim_clean", "cos_corrupted": "activation_sim_corrupted", "norm": "activation_norm"}


def default_mode() -> str:
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def cell_key(row: dict) -> str:
    """A row's (or summary cell's, with its experiment) place in the key path; see above."""
    exp = row["experiment"]
    site = row.get("site", "resid")
    where = f"layer_{row['layer']}" + (f"/head_{row['head']}" if row.get("head") is not None else "")
    step = {"iterative": f"iter_{row.get('iteration')}", "layer": "all_pos"}.get(exp, f"pos_{row.get('thought')}")
    prefix = {"knockout": f"knockout/{row.get('run')}/", "trace": "trace/"}.get(exp, "")
    if exp != "knockout" and site != "resid":
        prefix += f"{site}/"
    return f"{prefix}{where}/{step}"



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
            prefix = f"pair_{r['pair_id']}/{cell_key(r)}"
            for col, name in (NAMES | ACT_NAMES).items():
                if col in r and _num(r[col]) is not None:
                    data[f"{prefix}/{name}"] = _num(r[col])
        self.run.log(data)

    def log_summary(self, experiment: str, cells: list[dict]) -> None:
        if self.run is None:
            return
        data = {}
        for c in cells:
            cell = cell_key({"experiment": experiment, **c})
            m = c["metrics"]
            for col, key in AGGREGATES.items():
                if col in m and m[col].get("mean") is not None:
                    data[f"aggregate/{cell}/{key}"] = m[col]["mean"]
        self.run.log(data)

    def finish(self) -> str | None:
        if self.run is None:
            return None
        d = self.run.dir
        self.run.finish()
        return d
