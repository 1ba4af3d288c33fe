"""`Results`: a run — made by `thoughtpatch.run` or read back by `thoughtpatch.open_run` — as
tables (pandas), grids, the checklist, figures and the CLI's directory layout."""

from __future__ import annotations

import json
from pathlib import Path

from thoughtpatch.errors import ThoughtpatchError
from thoughtpatch.report.results import CELL_KEYS
from thoughtpatch.report.rundata import RunData, layer_key, metrics_of


class Results:
    """The rows, summaries and checks of one run.

    >>> res.to_pandas("position")          # one row per pair × cell, the columns of results.jsonl
    >>> res.grid("position", "kl")         # layer × thought means (and .grid(..., "ci_low"), "n", ...)
    >>> res.summary("position")            # one row per cell: every metric's mean, interval, n
    >>> res.checks                         # the validation checklist
    >>> res.plot("position", "kl")         # the CLI's heatmap, as a matplotlib Figure
    >>> res.save("runs/x")                 # the CLI's layout: `thoughtpatch report runs/x` works on it
    """

    def __init__(self, data: RunData):
        self.data = data

    # ---- what it holds --------------------------------------------------------------
    @property
    def experiments(self) -> list[str]:
        return self.data.experiments

    @property
    def manifest(self) -> dict:
        return self.data.manifest

    @property
    def sites(self) -> list[str]:
        return self.manifest.get("sites") or sorted({r.get("site", "resid") for rows in self.data.rows.values() for r in rows})

    @property
    def pair_ids(self) -> list[int]:
        return self.data.pair_ids

    @property
    def dropped(self):
        """The pairs dropped or answered wrong (ids, reason, expected and model answers), as a DataFrame."""
        import pandas as pd

        return pd.json_normalize(self.data.dropped) if self.data.dropped else pd.DataFrame(columns=["pair_id", "reason", "patched"])

    def __repr__(self) -> str:
        m = self.manifest
        model = Path(str(m.get("model", {}).get("checkpoint", "?"))).name
        mode = m.get("mode", {}).get("mode", "replace")
        return (
            f"Results(model={model!r}, family={m.get('model', {}).get('family', '?')}, pairs={len(self.data.pairs)}, "
            f"experiments={self.experiments}, sites={self.sites}, mode={mode}, direction={self.data.direction})"
        )

    def _exp(self, experiment: str) -> str:
        if experiment not in self.data.rows:
            raise ThoughtpatchError(f"no '{experiment}' results in this run (it has {', '.join(self.experiments)})")
        return experiment

    # ---- tables ---------------------------------------------------------------------
    def to_pandas(self, experiment: str):
        """One row per pair × cell, the columns of results.jsonl (NaN where a metric is undefined)."""
        import pandas as pd

        return pd.DataFrame(self.data.rows[self._exp(experiment)])

    def summary(self, experiment: str, pair_set: str = "all"):
        """One row per cell: for every metric its mean, ci_low, ci_high, ci_method and n
        (columns `<metric>`, `<metric>_ci_low`, ...). `pair_set="correct"`: over the pairs the
        model answers right on both sides only (recomputed from the rows)."""
        import pandas as pd

        from thoughtpatch.report.results import summarize

        exp = self._exp(experiment)
        if pair_set == "all":
            cells = self.data.summaries[exp]["cells"]
        elif pair_set == "correct":
            wrong = {d["pair_id"] for d in self.data.dropped}
            cells = summarize([r for r in self.data.rows[exp] if r["pair_id"] not in wrong], exp)
        else:
            raise ThoughtpatchError(f"pair_set must be all or correct, not {pair_set!r}")
        out = []
        for c in cells:
            row = {k: c.get(k) for k in CELL_KEYS[exp]} | {"n": c["n"]}
            for name, m in c["metrics"].items():
                row[name] = m.get("mean")
                for what in ("ci_low", "ci_high", "ci_method"):
                    row[f"{name}_{what}"] = m.get(what)
                row[f"{name}_n"] = m.get("n")
            out.append(row)
        return pd.DataFrame(out)

    def grid(self, experiment: str, metric: str, what: str = "mean", site: str | None = None, head: int | None = None, run: str | None = None):
        """A location × thought (Exp 2: × iteration; layer patching: one column) DataFrame of one
        statistic of one metric: `what` = mean, ci_low, ci_high, std or n. With several sites,
        name one; for the head site rows are (layer, head) unless `head` picks one."""
        import pandas as pd

        exp = self._exp(experiment)
        keys = CELL_KEYS[exp]
        step = {"position": "thought", "trace": "thought", "knockout": "thought", "iterative": "iteration"}.get(exp)
        sel = {"site": site, "head": head, "run": run}
        cells = []
        for key, c in self.data.cells(exp).items():
            named = dict(zip(keys, key))
            if any(v is not None and named.get(k) != v for k, v in sel.items()):
                continue
            cells.append((named, c))
        for k in ("site", "run"):
            vals = {n.get(k) for n, _ in cells} - {None}
            if len(vals) > 1:
                raise ThoughtpatchError(f"{exp}: cells of several {k}s ({', '.join(sorted(map(str, vals)))}); pass {k}=")
        if not cells:
            raise ThoughtpatchError(f"{exp}: no cells for {', '.join(f'{k}={v}' for k, v in sel.items() if v is not None)}")
        data: dict = {}
        for named, c in cells:
            m = c["metrics"].get(metric)
            if m is None:
                raise ThoughtpatchError(f"{exp}: no metric '{metric}' (have {', '.join(c['metrics'])})")
            row = named["layer"] if named.get("head") is None or head is not None else (named["layer"], named["head"])
            col = named[step] if step else "all"
            data.setdefault(col, {})[row] = m.get(what)
        df = pd.DataFrame(data)
        order = sorted(df.index, key=lambda r: (layer_key(r[0]), r[1]) if isinstance(r, tuple) else (layer_key(r), -1))
        df = df.loc[order, sorted(df.columns, key=lambda c: -1 if c == "all" else c)]
        df.index.name = "layer" if not isinstance(order[0], tuple) else "layer, head"
        df.columns.name = step or "thoughts"
        return df

    @property
    def checks(self):
        """The validation checklist: name, value, verdict (pass / warn / fail / info), detail."""
        import pandas as pd

        return pd.DataFrame(self.data.checks, columns=["name", "value", "verdict", "detail"])

    # ---- figures and files -----------------------------------------------------------
    def plot(self, experiment: str, metric: str | None = None, site: str | None = None):
        """The CLI's figure for an experiment (Exp 1 / trace / knockout: the heatmap of `metric`;
        Exp 2: its trajectories; layer patching: its curve), returned as a matplotlib Figure."""
        from thoughtpatch.report.figures import figure

        exp = self._exp(experiment)
        return figure(self.data, exp, metric or metrics_of(exp)[0], site=site)

    def save(self, run_dir: str | Path, report: bool = True) -> Path:
        """Write the CLI's directory layout (manifest, pairs, results.jsonl, summary.json,
        checks.json; figures and reports unless report=False)."""
        from thoughtpatch.data.schema import atomic_write_text
        from thoughtpatch.report.results import _clean
        from thoughtpatch.report.rundir import RunLock, claim_out

        out = Path(run_dir)
        claim_out(out, resume=False)
        out.mkdir(parents=True, exist_ok=True)
        with RunLock(out):
            for exp, rows in self.data.rows.items():
                atomic_write_text(out / exp / "results.jsonl", "".join(json.dumps({k: _clean(v) for k, v in r.items()}) + "\n" for r in rows))
                atomic_write_text(out / exp / "summary.json", json.dumps(self.data.summaries[exp], indent=1) + "\n")
            atomic_write_text(out / "pairs.json", json.dumps(self.data.pairs, indent=1) + "\n")
            atomic_write_text(out / "dropped_pairs.json", json.dumps(self.data.dropped, indent=1) + "\n")
            atomic_write_text(out / "checks.json", json.dumps({"checks": self.data.checks}, indent=1) + "\n")
            atomic_write_text(out / "manifest.json", json.dumps(self.manifest | {"config": self.manifest.get("config", {}) | {"out": str(out)}}, indent=1) + "\n")
        if report:
            from thoughtpatch.report.markdown import write_reports

            write_reports(out)
        return out


def open_run(run_dir: str | Path) -> Results:
    """Any CLI run directory (merged shards included) as `Results`."""
    from thoughtpatch.report.rundata import load_run

    return Results(load_run(run_dir))
