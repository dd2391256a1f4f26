"""Reference values from R (``survival``, ``riskRegression``, ``pec``), committed beside the R
scripts that compute them.

Each reference script ``tests/reference/<script>.R`` has a ``tests/reference/<script>.json``:
per case, the exact input the script reads (built here, the one definition the tests use too)
and the output R gave. Tests compare our values with the committed output, with no R installed
(after checking their input is still the committed one), and the e2e tier runs R on the
committed inputs and compares its output too: a failure says which side moved, ours, R's or
the data. ``python tests/reference/make_r_reference.py`` rewrites the JSON (needs Rscript and
the packages of :data:`PACKAGES`); read its diff before committing it.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter
from sksurv.datasets import load_gbsg2
from tools import tool

REFERENCE = Path(__file__).parents[1] / "reference"
MAKE = "python tests/reference/make_r_reference.py"


# --- the cases: what each script is given ------------------------------------------------------

def cox_tied() -> dict[str, np.ndarray]:
    """60 patients on 8 distinct times: several events per time, censorings at event times."""
    rng = np.random.default_rng(7)
    n = 60
    time = rng.integers(1, 9, n).astype(float)
    event = rng.random(n) < 0.6
    time[:6], event[:6] = 4.0, [True, True, True, False, False, True]  # 4 events + 2 censored
    x = np.column_stack([rng.normal(size=n), rng.integers(0, 2, n)])
    return {"time": time, "event": event, "x": x, "beta": np.array([0.8, -0.5]),
            "weight": rng.uniform(0.5, 2.0, n)}


def field_note() -> dict[str, np.ndarray]:
    """An event and a censoring at t = 1: the censored patient is in the event's risk set (the
    trap the team's field note on Cox ties names)."""
    return {"time": np.array([1.0, 1.0, 2.0, 3.0]), "event": np.array([True, False, True, False]),
            "x": np.array([[0.5], [-1.0], [2.0], [0.3]]), "beta": np.array([0.7])}


def extreme_risks() -> np.ndarray:
    """Covariate of :func:`cox_tied`'s patients giving risks from -50 to 50 (beta = 1)."""
    x = np.linspace(-50.0, 50.0, 60)[:, None]
    return x[np.random.default_rng(3).permutation(len(x))]


def gbsg2() -> tuple[pd.DataFrame, list[str], CoxPHFitter]:
    """GBSG2 (686 patients) with numeric covariates, and lifelines' Cox fit of it."""
    features, outcome = load_gbsg2()
    frame = pd.DataFrame({
        "age": features["age"], "estrec": features["estrec"], "pnodes": features["pnodes"],
        "progrec": features["progrec"], "tsize": features["tsize"],
        "hormone": (features["horTh"] == "yes").astype(float),
        "grade": features["tgrade"].map({"I": 1.0, "II": 2.0, "III": 3.0}).astype(float),
        "time": outcome["time"], "event": outcome["cens"].astype(int)})
    fitter = CoxPHFitter().fit(frame, duration_col="time", event_col="event")
    covariates = [c for c in frame.columns if c not in ("time", "event")]
    return frame, covariates, fitter


def metrics_tied() -> pd.DataFrame:
    """90 patients on integer months: tied event times, events tied with censorings, tied risks."""
    rng = np.random.default_rng(5)
    n = 90
    risk = np.round(rng.normal(size=n), 1)
    time = np.ceil(rng.exponential(30.0 * np.exp(-risk)))
    event = rng.random(n) < 0.65
    time[:5], event[:5] = 12.0, [True, True, False, False, True]
    return pd.DataFrame({"time": time, "status": event.astype(int), "risk": risk,
                         "group": (risk > np.median(risk)).astype(int)})


HORIZONS = (36.0, 60.0, 84.0)


def ipcw_cohort(tied: bool) -> dict[str, Any]:
    """300 patients: exponential times with log hazard = risk (two covariates and noise the
    risk does not see), uniform censoring from 12 to 150 months; ``tied``: times rounded up to
    whole months, so events share their times with censorings. With the horizons and the
    1-month grid of the integrated Brier score (from the first whole month of follow-up to the
    last horizon), as ``evaluate._ibs`` builds it."""
    rng = np.random.default_rng(4)
    n = 300
    x = np.column_stack([rng.normal(size=n), rng.integers(0, 2, n)])
    risk = x @ np.array([0.8, 0.6]) + rng.normal(0.0, 0.3, n)
    latent = rng.exponential(80.0 * np.exp(-risk))
    censor = rng.uniform(12.0, 150.0, n)
    time = np.minimum(latent, censor)
    if tied:
        time = np.ceil(time)
    grid = np.arange(np.ceil(time.min()), HORIZONS[-1] + 1.0)
    return {"data": {"time": time, "status": (latent <= censor).astype(int), "risk": risk},
            "horizons": np.array(HORIZONS), "grid": grid}


def cox_inputs(time: Any, status: Any, x: np.ndarray, beta: Any,
               weight: Any = None) -> dict[str, Any]:
    """What cox_loglik.R reads: data (time, status, weight, x1..xk) and beta."""
    data = {"time": np.asarray(time, dtype=float), "status": np.asarray(status, dtype=int),
            "weight": np.ones(len(time)) if weight is None else np.asarray(weight, dtype=float)}
    data |= {f"x{j + 1}": x[:, j].astype(float) for j in range(x.shape[1])}
    return {"data": data, "beta": np.asarray(beta, dtype=float)}


def metrics_inputs(frame: pd.DataFrame) -> dict[str, Any]:
    """What survival_metrics.R reads: time, status, risk (higher = worse), group (1 = high)."""
    return {"data": {column: frame[column].to_numpy() for column in
                     ("time", "status", "risk", "group")}}


def _cox(case: dict[str, np.ndarray], weighted: bool = False) -> dict[str, Any]:
    return cox_inputs(case["time"], case["event"], case["x"], case["beta"],
                      case["weight"] if weighted else None)


def _gbsg2() -> dict[str, Any]:
    frame, covariates, fitter = gbsg2()
    return cox_inputs(frame["time"], frame["event"], frame[covariates].to_numpy(),
                      fitter.params_[covariates].to_numpy())


def _extreme() -> dict[str, Any]:
    tied = cox_tied()
    return cox_inputs(tied["time"], tied["event"], extreme_risks(), [1.0])


CASES: dict[str, dict[str, Callable[[], dict[str, Any]]]] = {
    "cox_loglik": {
        "field_note": lambda: _cox(field_note()),
        "tied": lambda: _cox(cox_tied()),
        "tied_weighted": lambda: _cox(cox_tied(), weighted=True),
        "extreme_risks": _extreme,
        "gbsg2": _gbsg2,
    },
    "survival_metrics": {"tied": lambda: metrics_inputs(metrics_tied())},
    "ipcw_scores": {"continuous": lambda: ipcw_cohort(tied=False),
                    "tied": lambda: ipcw_cohort(tied=True)},
}

PACKAGES: dict[str, tuple[str, ...]] = {
    "cox_loglik": ("survival",),
    "survival_metrics": ("survival",),
    "ipcw_scores": ("survival", "riskRegression", "pec"),
}
"""The R packages each script loads (each a test tool besides Rscript, but survival, which
Rscript's Debian package brings: tests/support/tools.py)."""


# --- running a script --------------------------------------------------------------------------

def _write_data(inputs: dict[str, Any], folder: Path) -> Path:
    path = folder / "data.csv"
    pd.DataFrame(inputs["data"]).to_csv(path, index=False, float_format="%.17g")
    return path


def _rscript(script: str, *paths: Path) -> None:
    done = subprocess.run([tool("Rscript"), "--vanilla", str(REFERENCE / f"{script}.R"),
                           *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{script}.R failed:\n{done.stderr}"


def _run_cox_loglik(inputs: dict[str, Any], folder: Path) -> dict[str, Any]:
    data = _write_data(inputs, folder)
    pd.DataFrame({"beta": inputs["beta"]}).to_csv(folder / "beta.csv", index=False,
                                                  float_format="%.17g")
    _rscript("cox_loglik", data, folder / "beta.csv", folder / "out.csv")
    out = pd.read_csv(folder / "out.csv")
    return dict(zip(out["ties"], out["loglik"].astype(float), strict=True))


def _run_survival_metrics(inputs: dict[str, Any], folder: Path) -> dict[str, Any]:
    data = _write_data(inputs, folder)
    _rscript("survival_metrics", data, folder / "scalars.csv", folder / "basehaz.csv")
    scalars = pd.read_csv(folder / "scalars.csv")
    basehaz = pd.read_csv(folder / "basehaz.csv")
    return {"scalars": dict(zip(scalars["name"], scalars["value"].astype(float), strict=True)),
            "basehaz": {"time": basehaz["time"].to_numpy(float),
                        "hazard": basehaz["hazard"].to_numpy(float)}}


def _run_ipcw_scores(inputs: dict[str, Any], folder: Path) -> dict[str, Any]:
    for package in PACKAGES["ipcw_scores"][1:]:
        tool(package)  # installed, and declared by the test that runs this
    data = _write_data(inputs, folder)
    pd.DataFrame({"kind": ["horizon"] * len(inputs["horizons"]) + ["grid"] * len(inputs["grid"]),
                  "time": np.concatenate([inputs["horizons"], inputs["grid"]])}).to_csv(
        folder / "times.csv", index=False, float_format="%.17g")
    outputs = [folder / f"{name}.csv" for name in ("score", "grid", "scalars")]
    _rscript("ipcw_scores", data, folder / "times.csv", *outputs)
    score, grid, scalars = (pd.read_csv(path) for path in outputs)
    return {"horizons": {column: score[column].to_numpy(float) for column in score.columns},
            "grid": {column: grid[column].to_numpy(float) for column in grid.columns},
            "scalars": dict(zip(scalars["name"], scalars["value"].astype(float), strict=True))}


RUNNERS: dict[str, Callable[[dict[str, Any], Path], dict[str, Any]]] = {
    "cox_loglik": _run_cox_loglik,
    "survival_metrics": _run_survival_metrics,
    "ipcw_scores": _run_ipcw_scores,
}


def run_r(script: str, inputs: dict[str, Any], folder: Path) -> dict[str, Any]:
    """What ``tests/reference/<script>.R`` gives for ``inputs`` now (CSV files in ``folder``)."""
    return RUNNERS[script](inputs, folder)


def r_versions(packages: tuple[str, ...] = ("survival",)) -> str:
    done = subprocess.run([tool("Rscript"), "--vanilla", str(REFERENCE / "versions.R"),
                           *packages], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# --- the committed values ----------------------------------------------------------------------

def flat(value: Any, name: str = "") -> dict[str, float]:
    """Nested inputs or outputs as {"basehaz.time[3]": 12.0, ...}, for comparisons that name
    the value that differs."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items()
                for k, v in flat(item, f"{name}.{key}" if name else key).items()}
    if np.ndim(value):
        return {f"{name}[{i}]": float(item) for i, item in enumerate(np.asarray(value))}
    return {name: float(value)}


@dataclass(frozen=True)
class Case:
    script: str
    name: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]

    def given(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """R's committed output, once ``inputs`` (as a test built them) are found to be the
        ones R was given: otherwise the data moved, not our code or R."""
        ours, committed = flat(inputs), flat(self.inputs)
        assert ours.keys() == committed.keys() and all(
            np.isclose(ours[key], committed[key], rtol=1e-15, atol=0) for key in ours), (
            f"the inputs of case {self.name!r} differ from tests/reference/{self.script}.json "
            f"(first: {next((k for k in ours if ours[k] != committed.get(k)), None)}): the test "
            f"data moved; if that is meant, run `{MAKE}` (needs R)")
        return self.outputs


def _arrays(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _arrays(item) for key, item in value.items()}
    return np.asarray(value, dtype=float) if isinstance(value, list) else value


def committed(script: str) -> dict[str, Case]:
    """The cases of ``tests/reference/<script>.json``, lists read as float arrays."""
    document = json.loads((REFERENCE / f"{script}.json").read_text())
    return {name: Case(script, name, _arrays(case["inputs"]), _arrays(case["outputs"]))
            for name, case in document["cases"].items()}


def case(script: str, name: str) -> Case:
    return committed(script)[name]


def _json(value: Any, indent: str = "") -> str:
    """JSON with one key per line and number lists wrapped at 100 columns (readable diffs)."""
    if isinstance(value, dict):
        inner = indent + "  "
        items = [f"{inner}{json.dumps(key)}: {_json(item, inner)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, np.ndarray | list):
        numbers = ", ".join(json.dumps(item) for item in np.asarray(value).tolist())
        lines = textwrap.wrap(numbers, 100 - len(indent) - 2, break_on_hyphens=False)
        if len(lines) <= 1:
            return f"[{numbers}]"
        body = "\n".join(f"{indent}  {line}" for line in lines)
        return f"[\n{body}\n{indent}]"
    return json.dumps(value.item() if isinstance(value, np.generic) else value)


def write(script: str, folder: Path) -> Path:
    """Run ``<script>.R`` on every case and write ``tests/reference/<script>.json``."""
    cases = {}
    for name, build in CASES[script].items():
        inputs = build()
        work = folder / script / name
        work.mkdir(parents=True)
        cases[name] = {"inputs": inputs, "outputs": run_r(script, inputs, work)}
    document = {"script": f"{script}.R", "made_by": MAKE, "r": r_versions(PACKAGES[script]),
                "cases": cases}
    path = REFERENCE / f"{script}.json"
    path.write_text(_json(document) + "\n")
    return path
