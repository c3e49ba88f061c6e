"""evals/: the lm-eval backend, the depth curve, and MLflow logging, all offline."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from mlflow import MlflowClient

from cli.main import main as mor_main
from evals.default_tasks import mc_items, prepare_default_tasks
from evals.lm_backend import MoRLM
from evals.pipeline import evaluate_export, run_eval
from evals.reporting import write_artifacts
from evals.runner import evaluate_model, heldout_nll, task_items
from mor.checkpoint import save_pretrained
from mor.config import build_config
from mor.model import MoRModel
from trainers.data import DataConfig, prepare_data
from trainers.windows import TokenWindows

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMOLLM = SHARED / "tokenizers" / "smollm2" / "tokenizer.json"
EVAL_DIR = SHARED / "eval"
needs_shared = pytest.mark.skipif(not SMOLLM.is_file(), reason="../shared/data missing")
SMOLLM_EOS = 0  # <|endoftext|> in SmolLM2's vocabulary
PAPER_TASKS = [
    "lambada_openai",
    "hellaswag",
    "piqa",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "sciq",
    "openbookqa",
    "boolq",
]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may touch the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def random_model(router: str = "expert_choice") -> MoRModel:
    torch.manual_seed(0)
    cfg = build_config(
        "micro",
        vocab_size=49152,
        sharing="middle_cycle",
        num_recursions=2,
        num_layers=6,
        router=router,
        max_seq_len=64,
    )
    model = MoRModel(cfg).eval()
    if model.router is not None:
        for p in model.router.parameters():
            torch.nn.init.normal_(p, std=0.5)
    return model


def req(kind: str, *args: object) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@needs_shared
@pytest.mark.parametrize("router", ["expert_choice", "token_choice", "none"])
def test_loglikelihood_equals_direct_computation(router: str) -> None:
    model = random_model(router)
    texts = [
        ("The quick brown fox", " jumps over the dog"),
        ("To be, or not", " to be"),
        ("Numbers: 1 2 3", " 4 5 6 7 8"),
        ("A", "n apple a day keeps the doctor away"),
    ]
    results = {}
    for bs in (1, 3):
        lm = MoRLM(model=model, tokenizer=str(SMOLLM), batch_size=bs, eos_id=SMOLLM_EOS)
        results[bs] = lm.loglikelihood([req("loglikelihood", c, x) for c, x in texts])
    for (ctx, cont), (score, greedy), (score3, greedy3) in zip(texts, results[1], results[3]):
        # lm-eval's convention: context tokens, then the tail of the whole text's tokens.
        ctx_enc = lm.tok_encode(ctx)
        whole = ctx_enc + lm.tok_encode(ctx + cont)[len(ctx_enc) :]
        n_ctx = len(ctx_enc)
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), -1)
        target = torch.tensor(whole[n_ctx:])
        expected = logp[n_ctx - 1 :].gather(-1, target[:, None]).sum().item()
        assert score == pytest.approx(expected, abs=1e-4)
        assert score3 == pytest.approx(score, abs=1e-4)  # batching/padding changes nothing
        assert greedy == bool((logp[n_ctx - 1 :].argmax(-1) == target).all()) == greedy3

    # Rolling loglikelihood of a short document: log p(tok_0 | eot) + Σ log p(tok_i | ...).
    doc = "Once upon a time there was a recursive transformer."
    lm = MoRLM(model=model, tokenizer=str(SMOLLM), eos_id=SMOLLM_EOS)
    (rolled,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", doc)])
    toks = lm.tok_encode(doc)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([[lm.eot_token_id, *toks[:-1]]])).logits[0], -1)
    assert rolled == pytest.approx(
        logp.gather(-1, torch.tensor(toks)[:, None]).sum().item(), abs=1e-3
    )
    assert lm.tally.tokens > 0 and len(lm.tally.active_fractions()) == 2


@needs_shared
def test_topk_routing_is_the_training_selection_and_cannot_generate() -> None:
    model = random_model()
    lm = MoRLM(model=model, tokenizer=str(SMOLLM), eos_id=SMOLLM_EOS, routing="topk")
    text = "The quick brown fox jumps over the lazy dog. " * 3
    lm.loglikelihood([req("loglikelihood", text, " again")], disable_tqdm=True)
    assert lm.tally.active_fractions() == pytest.approx([1.0, 0.5], abs=0.03)
    with pytest.raises(ValueError, match="cannot generate"):
        lm.generate_until([req("generate_until", "Hi", {"until": ["."]})], disable_tqdm=True)
    with pytest.raises(ValueError, match="routing"):
        MoRLM(model=random_model("token_choice"), tokenizer=str(SMOLLM), eos_id=0, routing="topk")


@needs_shared
def test_generate_until_stops_and_rolling_windows() -> None:
    model = random_model()
    lm = MoRLM(model=model, tokenizer=str(SMOLLM), max_length=16, eos_id=SMOLLM_EOS)
    (free,) = lm.generate_until([req("generate_until", "Hello there", {"max_gen_toks": 8})])
    assert free
    stop = free[2:4] if len(free) > 4 else free[:1]
    (cut,) = lm.generate_until(
        [req("generate_until", "Hello there", {"max_gen_toks": 8, "until": [stop]})]
    )
    assert stop not in cut and free.startswith(cut)
    # A document longer than max_length is scored in several windows, each within 16 tokens.
    long_doc = " ".join(["recursion"] * 60)
    (score,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", long_doc)])
    assert score < 0


@needs_shared
def test_backend_uses_the_exports_eos_id(tmp_path: Path) -> None:
    """The id training separated documents with (meta.eos_id) is the backend's end-of-text:
    no guessing from token names. 7 is deliberately not a conventional end-of-text token."""
    model = random_model()
    export = save_pretrained(
        tmp_path / "export", model.cfg, model.state_dict(), {"eos_id": 7}, SMOLLM
    )
    lm = MoRLM(pretrained=str(export))
    assert lm.eot_token_id == 7
    doc = "Once upon a time there was a recursive transformer."
    (rolled,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", doc)])
    toks = lm.tok_encode(doc)
    with torch.no_grad():  # the first token is conditioned on the export's id, 7
        logp = F.log_softmax(model(torch.tensor([[7, *toks[:-1]]])).logits[0], -1)
    assert rolled == pytest.approx(logp.gather(-1, torch.tensor(toks)[:, None]).sum().item(), 1e-5)
    # The pipeline passes it on too: its held-out NLL is the eos_id=7 one, not the eos_id=0 one.
    report, _ = evaluate_export(
        export, ["mor_heldout_mc"], depths=["1"], limit=2, work_dir=tmp_path / "w"
    )
    with_7, with_0 = (
        heldout_nll(MoRLM(model=model, tokenizer=str(SMOLLM), depth=1, eos_id=e))
        for e in (7, SMOLLM_EOS)
    )
    assert report.points[0].nll == pytest.approx(with_7, abs=1e-9) and with_7 != with_0
    bare = save_pretrained(tmp_path / "bare", model.cfg, model.state_dict(), {}, SMOLLM)
    with pytest.raises(ValueError, match="eos_id"):
        MoRLM(pretrained=str(bare))
    with pytest.raises(ValueError, match="eos_id: 49152 is outside"):
        MoRLM(pretrained=str(export), eos_id=49152)


@needs_shared
@pytest.mark.parametrize("dtype", ["float64", "auto"])
def test_float64_model_is_scored_in_float64(dtype: str) -> None:
    model = random_model().double()
    lm = MoRLM(model=model, tokenizer=str(SMOLLM), eos_id=SMOLLM_EOS, dtype=dtype)
    ctx, cont = "The quick brown fox", " jumps over the lazy dog"
    ((score, _),) = lm.loglikelihood([req("loglikelihood", ctx, cont)])
    ctx_enc = lm.tok_encode(ctx)
    whole = ctx_enc + lm.tok_encode(ctx + cont)[len(ctx_enc) :]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0]
    assert logits.dtype == torch.float64
    target = torch.tensor(whole[len(ctx_enc) :])
    logp = F.log_softmax(logits, -1)[len(ctx_enc) - 1 :]
    # float32 log-softmax would be off by ~1e-5 here.
    assert score == pytest.approx(logp.gather(-1, target[:, None]).sum().item(), abs=1e-12)


@needs_shared
def test_heldout_nll_matches_the_previous_implementation() -> None:
    """Through lm-eval's public loglikelihood_rolling, the held-out NLL is the number the
    former private-method implementation gave for this model (recorded before the change)."""
    lm = MoRLM(model=random_model(), tokenizer=str(SMOLLM), batch_size=4, eos_id=SMOLLM_EOS)
    assert heldout_nll(lm, 4) == pytest.approx(10.796137248500113, abs=1e-6)


def test_default_mc_task_is_well_formed(tmp_path: Path) -> None:
    """Every non-overlapping span is an item; each wrong choice is the true span with one pair
    of adjacent words swapped; lm-eval asks for context + one space + choice (not two: the choices
    carry no leading space); the items come shuffled, so a ``limit`` samples every document."""
    from lm_eval.tasks import TaskManager, get_task_dict

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi".split()
    docs = [" ".join(words[(i + k) % len(words)] for k in range(400)) for i in range(3)]
    items = mc_items(docs)
    # 400 words of ~5.4 chars: ~2,150 chars a document, ~300 of context, ~60-char spans
    assert len(items) > 3 * 25 and items != mc_items(docs[::-1])
    assert all(len(i["choices"]) == 4 and 0 <= i["label"] < 4 for i in items)
    for item in items:
        true = item["choices"][item["label"]].split()
        assert not item["choices"][0].startswith(" ") and item["context"] and len(true) >= 4
        assert len(set(item["choices"])) == 4
        for wrong in (c.split() for i, c in enumerate(item["choices"]) if i != item["label"]):
            at = [k for k in range(len(true)) if wrong[k] != true[k]]
            assert len(at) == 2 and at[1] == at[0] + 1  # one adjacent pair, swapped
            assert (wrong[at[0]], wrong[at[1]]) == (true[at[1]], true[at[0]])
    first = [i["context"].split()[0] for i in items[:20]]  # documents start at different words
    assert len(set(first)) > 3
    out = prepare_default_tasks(tmp_path)
    assert (out / "mor_heldout_mc.yaml").is_file() and (out / "mor_heldout_bpb.jsonl").is_file()
    # Named by content: another version of the tasks would get its own folder.
    assert out.parent == tmp_path and prepare_default_tasks(tmp_path) == out
    lines = (out / "mor_heldout_mc.jsonl").read_text().splitlines()
    assert len(lines) > 1000  # 1,128 on Python 3.11.7 (one per 360 characters gave 181)
    manager = TaskManager(include_path=str(out), include_defaults=False)
    task = get_task_dict(["mor_heldout_mc"], manager)["mor_heldout_mc"]
    task.build_all_requests(limit=2)
    doc = json.loads(lines[0])
    first_item = sorted((i for i in task.instances if i.doc_id == 0), key=lambda i: i.idx)
    assert [i.arguments for i in first_item] == [(doc["context"], " " + c) for c in doc["choices"]]


@needs_shared
def test_item_scores_per_point_and_items_json(tmp_path: Path) -> None:
    """Each depth point keeps the accuracy task's per-item primary score (acc_norm) in doc_id
    order: ``limit`` of them, 0/1 each, averaging to lm-eval's own acc_norm; items.json holds
    them per point, results.json does not repeat them."""
    report = evaluate_model(
        random_model(),
        ["mor_heldout_mc", "mor_heldout_bpb"],
        depths=["1", "router"],
        limit=10,
        tokenizer=SMOLLM,
        eos_id=SMOLLM_EOS,
        nll_docs=0,
        work_dir=tmp_path / "w",
    )
    assert [p.label for p in report.points] == ["1", "router"]
    for p in report.points:
        assert set(p.items) == {"mor_heldout_mc", "mor_heldout_bpb"}
        assert all(len(pair) == 2 and pair[1] > 0 for pair in p.items["mor_heldout_bpb"])
        scores = p.items["mor_heldout_mc"]
        assert len(scores) == 10 and set(scores) <= {0.0, 1.0}
        assert sum(scores) / 10 == pytest.approx(p.metrics["mor_heldout_mc"]["acc_norm"])
    files = write_artifacts(report, tmp_path / "out")
    assert tmp_path / "out" / "items.json" in files
    items = json.loads((tmp_path / "out" / "items.json").read_text())
    assert list(items) == ["1", "router"]
    assert items["router"]["mor_heldout_mc"] == report.points[1].items["mor_heldout_mc"]
    assert "items" not in json.loads((tmp_path / "out" / "results.json").read_text())["points"][0]


def test_task_items_order_and_primary_metric() -> None:
    """Sorted by doc_id, acc_norm over acc, the first filter only; bits per byte as
    (loglikelihood, bytes) pairs; none for a task with neither."""
    samples = [
        {"doc_id": 2, "filter": "none", "acc": 1.0, "acc_norm": 0.0},
        {"doc_id": 0, "filter": "none", "acc": 0.0, "acc_norm": 1.0},
        {"doc_id": 1, "filter": "none", "acc": 1},
        {"doc_id": 0, "filter": "other", "acc": 0.0, "acc_norm": 0.0},
    ]
    bpb = [{"doc_id": 0, "filter": "none", "bits_per_byte": (-12.0, 40)}]
    results = {"samples": {"mc": samples, "bpb": bpb}}
    assert task_items(results, "mc") == [1.0, 1.0, 0.0]
    assert task_items(results, "bpb") == [[-12.0, 40.0]] and task_items({}, "mc") == []
    gen = {"samples": {"gen": [{"doc_id": 0, "filter": "none", "exact_match": "x"}]}}
    assert task_items(gen, "gen") == []


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MoR trained briefly on TinyShakespeare, exported like `mor train` does."""
    tmp = tmp_path_factory.mktemp("evalmodel")
    data = prepare_data(
        DataConfig(
            source=str(SHARED / "corpus" / "tinyshakespeare"),
            tokenizer=str(SMOLLM),
            seq_len=64,
            cache_dir=str(tmp),
        )
    )
    cfg = build_config(
        "micro",
        vocab_size=data.vocab_size,
        sharing="middle_cycle",
        num_recursions=2,
        num_layers=6,
        router="expert_choice",
        max_seq_len=128,
    )
    torch.manual_seed(0)
    model = MoRModel(cfg).train()
    ds = TokenWindows(data.dir, "train", 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        x = torch.stack([ds[(step * 8 + i) % len(ds)] for i in range(8)])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_pretrained(
        tmp / "export",
        cfg,
        model.state_dict(),
        meta={"eos_id": data.eos_id, "run_name": "evaltest"},
        tokenizer_path=data.tokenizer_path,
    )


@needs_shared
def test_depth_curve_on_every_task_logged_to_mlflow(trained_export: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("evals", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, run_name="train").info.run_id
    tasks = ["mor_heldout_bpb", "mor_heldout_mc", *PAPER_TASKS]
    report, run_id, out = run_eval(
        trained_export,
        tasks,
        data_dir=EVAL_DIR,
        limit=8,
        tracking_uri=uri,
        parent_run_id=parent,
        work_dir=tmp_path / "work",
        batch_size=32,
        topk=True,
    )
    assert [p.label for p in report.points] == ["1", "2", "router", "topk"]
    topk = report.points[-1]  # the non-causal point runs exactly the training capacities
    assert topk.active_fractions == pytest.approx([1.0, 0.5], abs=0.02)
    fixed = [p.flops_per_token for p in report.points if p.depth is not None]
    assert fixed[0] < fixed[1]  # one point per depth, increasing FLOPs
    router = report.points[-2]
    assert 1.0 <= router.mean_depth <= 2.0
    # Routing on held-out text: drift per recursion, depth vs difficulty and frequency.
    drift = report.routing["drift"]
    assert drift["capacity"] == [1.0, 0.5] and drift["active"][0] == 1.0
    assert 0.0 <= drift["active"][1] <= 1.0 and 0.0 <= drift["agreement"][1] <= 1.0
    buckets = report.routing["by_frequency"]
    assert [b["bucket"] for b in buckets] == ["most frequent", "frequent", "rare", "rarest"]
    assert sum(b["tokens"] for b in buckets) == report.routing["tokens"] > 1000
    assert all(1.0 <= b["mean_depth"] <= 2.0 for b in buckets)
    for p in report.points:
        for task in [*PAPER_TASKS, "mor_heldout_mc"]:
            assert "acc" in p.metrics[task] and "acc_stderr" in p.metrics[task], task
        assert "bits_per_byte" in p.metrics["mor_heldout_bpb"]
        assert p.nll is not None and 0 < p.nll < 11
        # Per-item scores of every accuracy task (lambada's acc too); for bits per byte each
        # document's (loglikelihood, bytes), whose ratio of sums is the task's metric.
        assert set(p.items) == {*PAPER_TASKS, "mor_heldout_mc", "mor_heldout_bpb"}
        accs = {t: v for t, v in p.items.items() if t != "mor_heldout_bpb"}
        assert all(len(v) == 8 and set(v) <= {0.0, 1.0} for v in accs.values())
        pairs = p.items["mor_heldout_bpb"]
        bpb = -sum(ll for ll, _ in pairs) / sum(b for _, b in pairs) / math.log(2)
        assert bpb == pytest.approx(p.metrics["mor_heldout_bpb"]["bits_per_byte"], rel=1e-6)
    assert "perplexity" in report.points[0].metrics["lambada_openai"]
    assert "acc_norm" in report.points[0].metrics["hellaswag"]
    run = client.get_run(run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert "eval/d2/piqa/acc" in run.data.metrics
    steps = [m.step for m in client.get_metric_history(run_id, "eval/flops_per_token")]
    assert steps == [0, 1, 2, 3]
    assert run.data.metrics["eval/drift/capacity_r2"] == 0.5
    assert {"eval/drift/agree_r2", "eval/dtopk/piqa/acc"} <= run.data.metrics.keys()
    assert "eval/routing/mean_depth_q4" in run.data.metrics
    files = {a.path for a in client.list_artifacts(run_id)}
    assert {
        "results.csv",
        "results.json",
        "items.json",
        "depth_curve.png",
        "router_histogram.png",
        "depth_map.html",
        "depth_map.png",
        "routing_drift.csv",
        "routing_by_frequency.csv",
        "depth_by_frequency.png",
    } <= files
    assert (out / "depth_curve.png").stat().st_size > 1000


@needs_shared
def test_eval_cli_offline_json(
    trained_export: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default (logging) path with an export that recorded no MLflow run: the URI comes
    from $MLFLOW_TRACKING_URI and the eval run is a top-level run there."""
    uri = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code = mor_main(
        [
            "eval",
            str(trained_export),
            "--tasks",
            "piqa,mor_heldout_mc",
            "--data-dir",
            str(EVAL_DIR),
            "--limit",
            "4",
            "--depths",
            "1,router",
            "--json",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 0
    got = json.loads(capsys.readouterr().out)
    assert [p["label"] for p in got["report"]["points"]] == ["1", "router"]
    run = MlflowClient(uri).get_run(got["mlflow_run_id"])
    assert "mlflow.parentRunId" not in run.data.tags and "eval/d1/piqa/acc" in run.data.metrics
    assert mor_main(["eval", str(trained_export), "--tasks", "nope"]) == 2
    assert "tasks: unknown task(s) ['nope']" in capsys.readouterr().err
    assert mor_main(["eval", str(trained_export), "--depths", "1,deep"]) == 2
    assert "depths: 'deep' is not a depth point of this model" in capsys.readouterr().err
    assert mor_main(["eval", str(tmp_path)]) != 0


# ------------------------------------------------------------------ `mor eval EXPORT` as typed
def user_env(tmp: Path, **extra: str) -> dict[str, str]:
    """A shell with no tracking settings and no `mor up` stack: only the export says where."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(MOR_STACK_DIR=str(tmp / "no-stack"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(extra)
    return env


def mor_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mor")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "cli.main"]
    return subprocess.run(
        [*cmd, *args], env=env, capture_output=True, text=True, timeout=900, check=False
    )


@pytest.fixture(scope="module")
def trained_run(trained_export: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(export, MLflow run id): the export laid out as `mor train` leaves it
    (STORAGE/runs/NAME/export), recording its training run and tracking URI, and logged as
    the run's MLflow model, as the launcher does (tests/test_trainer.py checks the launcher
    writes them; tests/test_stack.py runs the real `mor train` then `mor eval` on the
    `mor up` stack)."""
    from core.mlflow_model import log_export_model
    from core.storage import Location
    from trainers.tracking import connect, find_or_create_run

    tmp = tmp_path_factory.mktemp("trained")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client, exp_id = connect(uri, "mor")
    state = tmp / "runs" / "evalcli"
    home = Location.parse(state)
    run_id, _ = find_or_create_run(client, exp_id, "evalcli", home, {"model.preset": "micro"})
    client.set_terminated(run_id, status="FINISHED")
    export = state / "export"
    shutil.copytree(trained_export, export)
    payload = json.loads((export / "config.json").read_text())
    payload["meta"].update(mlflow_run_id=run_id, tracking_uri=uri)
    (export / "config.json").write_text(json.dumps(payload))
    log_export_model(uri, run_id, export, step=40)
    return export, run_id


@needs_shared
def test_mor_eval_export_logs_under_the_training_run(
    trained_run: tuple[Path, str], tmp_path: Path
) -> None:
    """The README's `mor eval outputs/runs/NAME/export`, no tracking flag, no env: the eval
    run lands under the training run in the MLflow the export recorded."""
    export, train_run_id = trained_run
    meta = json.loads((export / "config.json").read_text())["meta"]
    assert meta["mlflow_run_id"] == train_run_id and meta["tracking_uri"]
    proc = mor_cli("eval", str(export), "--limit", "4", env=user_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mean depth" in proc.stdout and "Traceback" not in proc.stderr
    client = MlflowClient(meta["tracking_uri"])
    eval_id = client.get_run(train_run_id).data.tags["mor.eval_run_id"]
    run = client.get_run(eval_id)
    assert run.data.tags["mlflow.parentRunId"] == train_run_id
    assert run.data.tags["mor.kind"] == "eval" and run.info.status == "FINISHED"
    assert run.info.run_name == "eval · evalcli"  # named by its model (the training run)
    assert "eval/drouter/mor_heldout_mc/acc" in run.data.metrics
    assert eval_id in proc.stdout


@needs_shared
def test_mor_eval_of_a_logged_mlflow_model(
    trained_run: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training run's MLflow model, by `runs:/RUN_ID/model` as typed (MLflow found by
    $MLFLOW_TRACKING_URI) and, once registered, by `models:/NAME/VERSION`: downloaded into
    the local cache and evaluated under the training run."""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    export, train_run_id = trained_run
    uri = json.loads((export / "config.json").read_text())["meta"]["tracking_uri"]
    client = MlflowClient(uri)
    exp_id = client.get_run(train_run_id).info.experiment_id
    (logged,) = client.search_logged_models([exp_id], f"source_run_id = '{train_run_id}'")
    assert logged.name == "model" and logged.status == LoggedModelStatus.READY
    assert logged.params["router"] == "expert_choice"
    cache = tmp_path / "cache"
    env = user_env(tmp_path, MLFLOW_TRACKING_URI=uri, MOR_CACHE_DIR=str(cache))
    args = ("--limit", "2", "--depths", "1", "--tasks", "mor_heldout_mc", "--json")
    proc = mor_cli("eval", f"runs:/{train_run_id}/model", *args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout[proc.stdout.index("{") :])
    local = cache / "mlflow-models" / logged.model_id / "artifacts" / "export"
    assert got["report"]["model"] == str(local) and (local / "model.pt").is_file()
    run = client.get_run(got["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == train_run_id  # the export's record
    # Registered, then by name and version: the same logged model, from the cache.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MOR_CACHE_DIR", str(cache))
    version = mlflow.register_model(f"runs:/{train_run_id}/model", "evalcli")
    from evals.lm_backend import export_path

    assert export_path(f"models:/evalcli/{version.version}") == str(local)
    assert mor_main(["eval", "models:/evalcli/99", "--no-mlflow"]) == 2  # no such version


@needs_shared
def test_mor_eval_keeps_results_when_mlflow_is_down(
    trained_run: tuple[Path, str], tmp_path: Path
) -> None:
    """An export whose recorded MLflow is a dead server: the results are written and printed,
    then one clear error naming the URI (credentials redacted), exit 1, no traceback."""
    export = tmp_path / "runs" / "moved" / "export"
    shutil.copytree(trained_run[0], export)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    payload = json.loads((export / "config.json").read_text())
    payload["meta"]["tracking_uri"] = f"http://mor:s3cret@127.0.0.1:{port}"
    (export / "config.json").write_text(json.dumps(payload))
    env = user_env(tmp_path, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    proc = mor_cli("eval", str(export), "--limit", "2", "--depths", "1", env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    out = export.parent / "eval"
    assert (out / "results.csv").is_file() and (out / "results.json").is_file()
    assert "mean depth" in proc.stdout  # the table came before the failure
    assert f"error: could not log to MLflow at http://127.0.0.1:{port}" in proc.stderr
    assert str(out) in proc.stderr
    assert "Traceback" not in proc.stderr and "s3cret" not in proc.stdout + proc.stderr


def test_lm_eval_command_line_runs_the_mor_backend(trained_export: Path, tmp_path: Path) -> None:
    """`mor lm-eval ARGS` as a lm-eval user types them: lm-eval's own command line, with the
    `mor` backend registered and the embedded tasks found; its accuracy is the platform's own
    at that depth on the same items."""
    out = tmp_path / "lm-eval-out"
    args = ["lm-eval", "--model", "mor", "--model_args", f"pretrained={trained_export},depth=1",
            "--tasks", "mor_heldout_mc", "--limit", "4", "--output_path", str(out)]  # fmt: skip
    run = mor_cli(*args, env=user_env(tmp_path))
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "mor_heldout_mc" in run.stdout  # lm-eval's own results table
    (results,) = out.rglob("results_*.json")
    acc = json.loads(results.read_text())["results"]["mor_heldout_mc"]["acc,none"]
    ours = evaluate_model(trained_export, ["mor_heldout_mc"], depths=["1"], limit=4, nll_docs=0)
    assert acc == pytest.approx(ours.points[0].metrics["mor_heldout_mc"]["acc"])
    # lm-eval's own exit status comes back (an option it does not know: its argparse error,
    # before its ~16-s task index is built).
    bad = mor_cli("lm-eval", "--model", "mor", "--no-such-option", env=user_env(tmp_path))
    assert bad.returncode == 2 and "--no-such-option" in bad.stderr
