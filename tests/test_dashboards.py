"""dashboards/: Pareto fronts, plots, tables and the interactive report from a real sweep."""

from __future__ import annotations

import http.server
import re
import shutil
import subprocess
import threading
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from conftest import _free_port, start_mlflow, stop
from mlflow import MlflowClient
from PIL import Image

from cli.main import main as mor_main
from dashboards.pareto import pareto_front
from dashboards.report import DELTA, SIGNIFICANT, build_report
from dashboards.style import FRONT_COLOR, model_colors


def pts(rows: list[tuple[float, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"id": i, "cost": c, "acc": a} for i, (c, a) in enumerate(rows)])


def test_pareto_dominated_points_removed() -> None:
    df = pts([(1, 0.3), (2, 0.5), (3, 0.4), (4, 0.6), (2.5, 0.5)])
    front = pareto_front(df, "cost", "acc")
    assert front["id"].tolist() == [0, 1, 3]  # (3, .4) and (2.5, .5) are dominated


def test_pareto_ties_single_point_and_direction() -> None:
    tied = pareto_front(pts([(1, 0.5), (1, 0.5), (2, 0.4)]), "cost", "acc")
    assert tied["id"].tolist() == [0, 1]  # exact duplicates both stay
    assert pareto_front(pts([(5, 0.1)]), "cost", "acc")["id"].tolist() == [0]
    nll = pareto_front(
        pts([(1, 3.0), (2, 2.0), (3, 2.5)]), "cost", "acc", quality_higher_is_better=False
    )
    assert nll["id"].tolist() == [0, 1]  # lower NLL is better
    assert pareto_front(pts([]).reindex(columns=["id", "cost", "acc"]), "cost", "acc").empty


def test_points_whose_interval_reaches_the_front_are_marked() -> None:
    from dashboards.pareto import front_status

    df = pd.DataFrame(
        {
            "cost": [1.0, 1.0, 2.0, 0.5],
            "acc": [0.60, 0.65, 0.50, 0.40],
            "acc_ci_low": [0.50, 0.60, 0.45, 0.35],
            "acc_ci_high": [0.70, 0.70, 0.55, 0.45],
        },
        index=["a", "b", "c", "d"],
    )
    got = front_status(df, "cost", "acc")
    # b and d are the front; a's interval reaches b's 0.65 at the same cost; c's does not.
    assert got.to_dict() == {"a": "≈ front", "b": "front", "c": "", "d": "front"}
    lower = df.assign(nll=1 - df["acc"], nll_ci_low=1 - df["acc_ci_high"],
                      nll_ci_high=1 - df["acc_ci_low"])  # fmt: skip
    assert front_status(lower, "cost", "nll", False).to_dict() == got.to_dict()
    assert set(front_status(df[["cost", "acc"]], "cost", "acc")) == {"front", ""}


def test_pareto_drops_nan_with_warning() -> None:
    df = pts([(1, 0.3), (float("nan"), 0.9), (2, float("nan")), (3, 0.5)])
    with pytest.warns(UserWarning, match="dropped 2"):
        front = pareto_front(df, "cost", "acc")
    assert front["id"].tolist() == [0, 3]


def test_report_from_a_real_sweep(tiny_sweep, tmp_path: Path) -> None:
    spec, res, _ = tiny_sweep
    rep = build_report(res.tracking_uri, [spec.name], tmp_path / "rep")
    assert len(rep.table) == 3  # one row per trial, the diverged one included
    assert set(rep.table["model"]) == {"vanilla", "mor-ec", "mor-tc-diverges"}
    assert rep.table["params_non_embedding"].gt(0).all()
    png = tmp_path / "rep" / "pareto.png"
    assert png.stat().st_size > 5000
    md = (tmp_path / "rep" / "results.md").read_text()
    assert sum(ln.startswith("|") for ln in md.splitlines()) == 5 and "mor_heldout_mc" in md
    assert md.startswith("**Best trial of tiny: ")  # the sweep's best by its metric, on top
    assert not rep.front.empty and "topk" not in set(rep.front["point"])
    # The MoR model has 4 points (d1, d2, router and the non-causal topk), vanilla 1.
    points = pd.read_csv(tmp_path / "rep" / "points.csv")
    assert sorted(points.groupby("model").size().tolist()) == [1, 4]
    # Beside its mean depth, the router's drift on held-out text and its causality gap.
    mor = rep.table.set_index("model").loc["mor-ec"]
    assert 0 <= mor["drift_max_gap"] <= 1 and 0 <= mor["drift_min_agree"] <= 1
    assert -1 <= mor["causality_gap"] <= 1 and -1 <= mor["spearman_depth_loss"] <= 1
    assert "drift_max_gap" in md and "causality_gap" in md
    # Every figure as a 200-dpi PNG and an SVG, each model in its one colour (issue #13).
    colors = model_colors(rep.table["model"])
    assert FRONT_COLOR not in colors.values()
    for name in ("pareto", "depth_curves", "router_depths", "iso_flop"):
        png, svg = tmp_path / "rep" / f"{name}.png", tmp_path / "rep" / f"{name}.svg"
        assert min(Image.open(png).info["dpi"]) >= 199.5, name
        assert all(colors[m] in svg.read_text() for m in ("mor-ec",)), name
    # Item-bootstrap CI of each model's average (from its eval's items.json), and MoR against
    # the vanilla model of its budget by a paired bootstrap on the same 10 items (issue #15).
    by_model = rep.table.set_index("model")
    for model in ("vanilla", "mor-ec"):
        row = by_model.loc[model]
        assert 0 <= row["avg_ci_low"] <= row["average"] <= row["avg_ci_high"] <= 1, model
    assert re.fullmatch(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]", mor[DELTA])
    assert mor[SIGNIFICANT] in ("yes", "no")
    low, high = (float(x) for x in re.findall(r"[+-]\d\.\d{3}", mor[DELTA])[1:])
    assert (mor[SIGNIFICANT] == "yes") == (low > 0 or high < 0)
    # Vanilla is the baseline; the diverged trial was never evaluated: empty cells.
    for model in ("vanilla", "mor-tc-diverges"):
        assert by_model.loc[model, DELTA] == by_model.loc[model, SIGNIFICANT] == "", model
    assert by_model.loc["mor-tc-diverges", ["avg_ci_low", "avg_ci_high"]].isna().all()
    assert f"| {DELTA} | {SIGNIFICANT} |" in md


def test_report_cli_and_errors(tiny_sweep, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec, res, _ = tiny_sweep
    out = tmp_path / "cli"
    code = mor_main(
        [
            "report",
            spec.name,
            "--out",
            str(out),
            "--tracking-uri",
            res.tracking_uri,
            "--metric",
            "mor_heldout_mc/acc",
            "--no-mlflow",
        ]
    )
    assert code == 0 and (out / "report.html").is_file()
    assert "3 trials" in capsys.readouterr().out
    assert mor_main(["report", "no-such-sweep", "--tracking-uri", res.tracking_uri]) == 2
    assert (
        mor_main(
            [
                "report",
                spec.name,
                "--tracking-uri",
                res.tracking_uri,
                "--metric",
                "bogus",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "--metric" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def served_by_mlflow(page: Path, tmp_path: Path) -> bytes:
    """``page`` logged to a run of a real MLflow server as the sweep logs its report, then
    fetched from the server's artifact endpoint, the request MLflow's artifact view makes."""
    port = _free_port()
    server = start_mlflow(port, tmp_path / "mlflow")
    try:
        url = f"http://127.0.0.1:{port}"
        client = MlflowClient(url)
        run = client.create_run(client.create_experiment("reports")).info.run_id
        client.log_artifact(run, str(page), artifact_path="report")
        query = f"get-artifact?path=report/{page.name}&run_uuid={run}"
        with urllib.request.urlopen(f"{url}/{query}", timeout=60) as response:
            return response.read()
    finally:
        stop(server)


def render_as_mlflow_does(html: bytes, tmp_path: Path) -> tuple[str, list[str]]:
    """(DOM after rendering, console errors) of ``html`` in headless Chromium under the
    restrictions of MLflow's artifact view, which shows an HTML artifact in an iframe with
    ``sandbox="allow-scripts"``: scripts run, the document has no origin (no storage, no
    cookies). The same sandbox, as a CSP header on a loopback page, applies here."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/report.html":  # e.g. the browser's favicon request
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Security-Policy", "sandbox allow-scripts")
            self.end_headers()
            self.wfile.write(html)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proc = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--enable-logging=stderr",
                "--virtual-time-budget=10000",
                "--dump-dom",
                f"http://127.0.0.1:{server.server_port}/report.html",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.shutdown()
        server.server_close()
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln and "rror" in ln]
    return proc.stdout, console


def _legend_colors(view: str) -> dict[str, str]:
    """A rendered plotly figure's legend: each entry's name → the colour of its swatch."""
    found = re.findall(
        r'class="legendtext"[^>]*data-unformatted="([^"]+)"[^>]*>[^<]*</text>'
        r".*?(?:stroke|fill): (rgb\([^)]*\))",
        view,
    )
    return dict(found)


def _rgb(hex_color: str) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run does)")
def test_html_report_renders_in_headless_chromium(tiny_sweep, tmp_path: Path) -> None:
    """The page as MLflow's artifact view shows it (served by a real MLflow server, rendered
    in headless Chromium under the view's sandbox): heading, tables, the Pareto, depth-curve and
    router views, one colour per model in all of them (the front in another), error bars from
    the task's standard errors, units on the axes, integer depth ticks."""
    spec, res, _ = tiny_sweep
    rep = build_report(
        res.tracking_uri, [spec.name], tmp_path / "html", "mor_heldout_mc/acc", False
    )
    page = rep.out_dir / "report.html"
    served = served_by_mlflow(page, tmp_path)
    assert served == page.read_bytes()  # whole: no size limit cut it
    dom, console = render_as_mlflow_does(served, tmp_path)
    assert not console, console  # no script error while the page rendered
    title = re.search(r"<title>(.*?)</title>", dom, re.S).group(1)
    assert title == "MoR sweep report: mor_heldout_mc/acc vs inference FLOPs per token"
    assert re.search(r"<h1>MoR sweep report: tiny</h1>", dom)
    # The table of depth points: vanilla's one point, MoR's d1, d2 and router.
    table = re.search(r'<table[^>]*id="mor-points".*?</table>', dom, re.S).group(0)
    rows = re.findall(r"<tr>\s*<td>([^<]*)</td>\s*<td>([^<]*)</td>", table)
    assert sorted(rows) == [
        ("mor-ec", "1"),
        ("mor-ec", "2"),
        ("mor-ec", "router"),
        ("vanilla", "1"),
    ]
    # The per-model results: mean depth beside the router's drift (issue #14).
    results = re.search(r'<table[^>]*id="mor-results".*?</table>', dom, re.S).group(0)
    assert "mean_depth" in results and "drift_max_gap" in results and "mor-ec" in results
    # Plotly drew each view in the browser: its SVG, markers, legend, axis titles.
    ids = ("mor-pareto", "mor-depths", "mor-router", "mor-points")
    at = [dom.index(f'id="{i}"') for i in ids]
    views = {i: dom[a:b] for i, a, b in zip(ids, at, at[1:], strict=False)}
    assert all('class="main-svg"' in v for v in views.values())
    pareto, depths, router = views["mor-pareto"], views["mor-depths"], views["mor-router"]
    assert len(re.findall(r'class="point"', pareto)) == 4  # the star is MoR's 3rd point
    assert len(re.findall(r'class="errorbar"', pareto)) >= 4  # lm-eval's standard errors
    colors = {m: _rgb(c) for m, c in model_colors(rep.table["model"]).items()}
    for view, legend in ((pareto, ["mor-ec", "vanilla", "Pareto front"]),
                         (depths, ["mor-ec", "vanilla"]), (router, ["mor-ec"])):  # fmt: skip
        drawn = _legend_colors(view)
        assert list(drawn) == legend, drawn
        assert all(drawn[m] == colors[m] for m in legend if m in colors), drawn
    assert _legend_colors(pareto)["Pareto front"] == _rgb(FRONT_COLOR)
    assert _rgb(FRONT_COLOR) not in colors.values()
    titles = " | ".join(re.findall(r'class="[xy]title"[^>]*>([^<]*)<', dom))
    for unit in ("FLOPs per token", "fraction correct", "recursions per token",
                 "fraction of tokens"):  # fmt: skip
        assert unit in titles, titles
    ticks = re.findall(r'class="xtick"[^>]*>.*?<text[^>]*>([^<]*)<', depths)
    assert ticks == ["1", "2"], ticks  # integer depths only


def test_lower_is_better_metrics_make_a_minimising_front() -> None:
    from dashboards.pareto import higher_is_better

    assert higher_is_better("average") and higher_is_better("piqa/acc_norm")
    for m in ("nll", "mor_heldout_bpb/bits_per_byte", "lambada_openai/perplexity"):
        assert not higher_is_better(m)
    df = pd.DataFrame({"id": [0, 1, 2], "cost": [1.0, 2.0, 3.0], "bpb": [2.0, 1.5, 1.8]})
    front = pareto_front(df, "cost", "bpb", higher_is_better("bpb/bits_per_byte"))
    assert front["id"].tolist() == [0, 1]  # 2 costs more and is worse (higher bpb) than 1


def test_flops_ticks_tell_close_budgets_apart(tmp_path: Path) -> None:
    """Training FLOPs a few per mille apart (trials stop at the budget's last whole step):
    the axis labels every tick differently ('1.992T', ...), not '2T' five times; far-apart
    values keep three digits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dashboards.style import flops_axis, si_ticks

    assert si_ticks([1e9, 2e9, 5e9]) == ["1G", "2G", "5G"]
    fig, ax = plt.subplots()
    values = [1.9888e12, 1.9935e12, 1.9962e12, 1.9973e12, 1.99995e12]
    ax.scatter(values, [1, 2, 3, 4, 5])
    flops_axis(ax, values)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    plt.close(fig)
    assert len(labels) >= 4 and len(set(labels)) == len(labels), labels
    assert all(label.endswith("T") for label in labels), labels


def test_router_depths_leave_out_an_empty_depth_zero() -> None:
    """Depth 0 appears in the router figures only where a routed model sends tokens there."""
    from dashboards.plots import depth_columns

    def points(zero: float) -> pd.DataFrame:
        return pd.DataFrame({
            "model": ["mor-ec", "mor-ec", "vanilla"], "router": ["expert_choice"] * 2 + ["none"],
            "fixed_depth": [False, True, True], "frac_depth_0": [zero, 0.3, 0.0],
            "frac_depth_1": [0.5, 0.4, 1.0], "frac_depth_2": [0.5 - zero, 0.3, 0.0],
        })  # fmt: skip

    assert depth_columns(points(0.0)) == ["frac_depth_1", "frac_depth_2"]
    assert depth_columns(points(0.1)) == ["frac_depth_0", "frac_depth_1", "frac_depth_2"]
