"""What a reviewer sees in MLflow, built from what the sites sent (aggregates only): no MLflow calls here.

- the job run's description (MLflow's ``mlflow.note.content`` tag, markdown): what the job is, where it stands,
  the held-out c-index per cancer with its interval, patients and deaths, how ``best.pt`` was chosen;
- per site and round, the site run's metrics: its training loss, training c-index, patients and deaths trained on,
  local training seconds, and its held-out c-index (interval), patients and deaths (per cancer too);
- per site, the site run's params: code version, cancers, patients and deaths (trained on, held out);
- `dashboard_url`: the link that opens the experiment on its training runs in MLflow 3's UI;
- expert routing as shares: of each modality's tokens, the share each expert received (a row sums to 1), so
  modalities of very different token counts (one CLS token a patient, thousands of WSI tokens) compare.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cancermoe.survival import PairCounts
from fedcommon.protocol import EvalReport, TrainReport

DESCRIPTION_TAG = "mlflow.note.content"  # the run's "Description" in the MLflow UI
SITE_PARAM_KEYS = ("version", "cancers", "patients.trained", "patients.held_out", "events.trained",
                   "events.held_out")


def site_training_metrics(report: TrainReport) -> dict[str, float]:
    """One site's training this round (its child run's metrics)."""
    return {"loss/train": float(report.loss), "cindex/train": report.pairs.cindex,
            "train_patients": float(report.patients), "train_events": float(report.events),
            "seconds/training": float(report.seconds)}


def site_evaluation_metrics(report: EvalReport, min_events: int) -> dict[str, float]:
    """One site's held-out patients under this round's global model: c-index (pairs within a cancer, summed over
    its cancers) with its 95% interval, patients and deaths, per cancer and over all."""
    metrics: dict[str, float] = {}
    pairs = PairCounts()
    deaths_all = 0
    for cancer, part in sorted(report.cancers.items()):
        patients, deaths = int(part.histogram.sum()), int(part.histogram[..., 1].sum())
        metrics[f"cindex/{cancer}"] = part.pairs.cindex
        metrics[f"eval_patients/{cancer}"] = float(patients)
        metrics[f"eval_events/{cancer}"] = float(deaths)
        pairs, deaths_all = pairs + part.pairs, deaths_all + deaths
    lower, upper = pairs.interval(0.95)
    metrics.update({"cindex": pairs.cindex, "cindex_lower": lower, "cindex_upper": upper,
                    "eval_patients": float(report.patients), "eval_events": float(deaths_all),
                    "few_events": float(deaths_all < min_events)})
    return metrics


def expert_shares(tokens: np.ndarray, modality_names: Sequence[str]) -> dict[str, float]:
    """``expert_share/<modality>/<expert>``: the share of that modality's tokens routed to the expert (a modality
    that routed no token this round has none)."""
    tokens = np.asarray(tokens, dtype=np.float64)
    shares: dict[str, float] = {}
    for modality, name in enumerate(modality_names[: tokens.shape[0]]):
        total = float(tokens[modality].sum())
        if total > 0:
            for expert in range(tokens.shape[1]):
                shares[f"expert_share/{name}/{expert}"] = float(tokens[modality, expert]) / total
    return shares


def site_params(version: str | None, metrics: Mapping[str, float]) -> dict[str, str]:
    """A site run's params from the first round it took part in (its ``site_metrics``): who it is and what it
    holds. Counts it did not report that round (it failed one half of the round) are left out."""
    params = {"version": version or "unknown"}
    cancers = sorted(key.split("/", 1)[1] for key in metrics if key.startswith("eval_patients/"))
    if cancers:
        params["cancers"] = ",".join(cancers)
    for param, key in (("patients.trained", "train_patients"), ("patients.held_out", "eval_patients"),
                       ("events.trained", "train_events"), ("events.held_out", "eval_events")):
        if key in metrics and math.isfinite(metrics[key]):
            params[param] = str(int(metrics[key]))
    return params


def run_description(*, rounds: int, local_epochs: int, aggregation: str, eval_fraction: float,
                    history: Sequence[Mapping[str, Any]], status: str, selection: str,
                    best_round: int | None = None, registered: str | None = None) -> str:
    """The job run's description (markdown): what it is, where it stands, and its held-out c-index."""
    sites = sorted({s for row in history for s in row.get("sites_trained", [])})
    done = max((int(row["round"]) for row in history), default=0)
    lines = [f"**Federated training of CancerMoE**: {len(sites)} site{'s' if len(sites) != 1 else ''}"
             f"{' (' + ', '.join(sites) + ')' if sites else ''}, {rounds} rounds of {local_epochs} local "
             f"epoch{'s' if local_epochs != 1 else ''}, {aggregation} aggregation. **{status}**: "
             f"{done} of {rounds} rounds done.", ""]
    if history:
        last = max(history, key=lambda row: int(row["round"]))
        metrics = last.get("metrics", {})
        cancers = sorted({k.split("/", 1)[1] for k in metrics
                          if k.startswith("cindex/") and "/site/" not in k and k != "cindex/train"} - {"all"})
        headline = (f"Held-out c-index, round {last['round']}: **{_fmt(metrics.get('cindex/all'))}** "
                    f"[{_fmt(metrics.get('cindex_lower/all'))}, {_fmt(metrics.get('cindex_upper/all'))}] on "
                    f"{_count(metrics.get('eval_patients/all'))} patients, {_count(metrics.get('eval_events/all'))} "
                    "deaths")
        lines += [headline + (f"; best.pt: round {best_round}." if best_round else "."), "",
                  f"Per cancer (each site keeps {eval_fraction:.0%} of its patients out of training; pairs within a "
                  "site and a cancer, summed; 95% interval):", "",
                  "| cancer | c-index | 95% interval | patients | deaths |", "|---|---|---|---|---|"]
        for cancer in [*cancers, "all"]:
            lines.append(f"| {cancer} | {_fmt(metrics.get(f'cindex/{cancer}'))} | "
                         f"[{_fmt(metrics.get(f'cindex_lower/{cancer}'))}, "
                         f"{_fmt(metrics.get(f'cindex_upper/{cancer}'))}] | "
                         f"{_count(metrics.get(f'eval_patients/{cancer}'))} | "
                         f"{_count(metrics.get(f'eval_events/{cancer}'))} |")
        lines.append("")
    if best_round:
        lines += [f"How best.pt was chosen: {selection}", ""]
    lines += ["Site runs (nested under this run): per round loss, c-index, patients, deaths and seconds; params: "
              "code version, cancers, patients and deaths. Figures (Artifacts, `figures/`): Kaplan-Meier curves of "
              "predicted high and low risk per cancer, expert routing shares per modality, c-index over rounds."]
    if registered:
        lines += ["", f"Registered model: `{registered}` (model card in its description)."]
    return "\n".join(lines)


def dashboard_url(tracking_uri: str, experiment_id: str | None = None, run_id: str | None = None) -> str | None:
    """Where a browser opens the experiment (or run) on a tracking server, as a training experiment: MLflow 3's UI
    chooses GenAI or model-training pages by its ``workflowType`` (kept in the browser, GenAI when never set),
    and the URL's ``workflowType=machine_learning`` sets it. None for a store that is not a server."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    base = tracking_uri.rstrip("/") + "/#/experiments"
    if experiment_id is None:
        return f"{base}?workflowType=machine_learning"
    page = f"/{experiment_id}/runs/{run_id}" if run_id else f"/{experiment_id}/runs"
    return f"{base}{page}?workflowType=machine_learning"


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _count(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else str(int(value))
