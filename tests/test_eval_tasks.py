"""Tests of the offline lm-eval task definitions (evals.tasks) on the real staged data.

For every task: the documents load through lm-eval from the converted files, their number is the
record count of the original release, and the first document's prompt, target, choices and
loglikelihood requests equal what lm-eval's BUILT-IN task definition produces for the same record
(the expectations are built by hand from the original files, following the built-in YAMLs). The
offline YAMLs are also compared field by field with the installed built-in YAMLs, and the
built-in definitions, pointed at our converted data, must give identical documents (all of them)
and identical prompts/targets/choices (on ~250 documents per task).
No model is needed. Skipped when /work/shared/data/eval is absent.
"""

from __future__ import annotations

import bz2
import importlib.util
import inspect
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.task import ConfigurableTask  # noqa: E402
from lm_eval.tasks import TaskManager, get_task_dict  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from evals.tasks import (  # noqa: E402
    FEWSHOT_AS_BUILTIN,
    TASK_NAMES,
    convert_task,
    prepare_tasks,
    task_manager,
)
from evals.tasks.convert import split_hellaswag_ctx  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eval"
BUILTIN = Path(lm_eval.__file__).resolve().parent / "tasks"
BUILTIN_YAML = {
    "lambada_openai": "lambada/lambada_openai.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "sciq": "sciq/sciq.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "boolq": "super_glue/boolq/default.yaml",
}
# record counts of the original releases (SOURCES.md section 2)
COUNTS = {
    "lambada_openai": 5153,
    "hellaswag": 10042,
    "piqa": 1838,
    "winogrande": 1267,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "sciq": 1000,
    "openbookqa": 500,
    "boolq": 3270,
}
METRICS = {
    "lambada_openai": {"perplexity", "acc"},
    "hellaswag": {"acc", "acc_norm"},
    "piqa": {"acc", "acc_norm"},
    "winogrande": {"acc"},
    "arc_easy": {"acc", "acc_norm"},
    "arc_challenge": {"acc", "acc_norm"},
    "sciq": {"acc", "acc_norm"},
    "openbookqa": {"acc", "acc_norm"},
    "boolq": {"acc"},
}

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"staged eval data missing: {DATA}")


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_tasks(DATA, tmp_path_factory.mktemp("eval_tasks"))


@pytest.fixture(scope="module")
def tasks(out_dir: Path) -> dict[str, Any]:
    manager = TaskManager(include_path=str(out_dir), include_defaults=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        task_dict = get_task_dict(list(TASK_NAMES), manager)
    assert set(task_dict) == set(TASK_NAMES)
    return task_dict


# --- the first original record of each task, and what the built-in makes of it -------------------
def _first_jsonl(rel: str) -> dict[str, Any]:
    with open(DATA / rel, encoding="utf-8") as fh:
        return json.loads(fh.readline())


def _first_label(rel: str) -> str:
    return (DATA / rel).read_text(encoding="utf-8").split()[0]


def expected_first(name: str) -> tuple[Any, Any, list[str] | None]:
    """(doc_to_text, doc_to_target, doc_to_choice) of the built-in for the first record."""
    if name == "lambada_openai":
        words = _first_jsonl("lambada_openai/lambada_test.jsonl")["text"].split(" ")
        return " ".join(words[:-1]), " " + words[-1], None
    if name == "hellaswag":
        lines = bz2.decompress((DATA / "hellaswag/hellaswag_val_full.txt.bz2").read_bytes())
        head, gold, *endings = lines.decode("utf-8").split("\n")[:6]
        # official record: activity_label "Roof shingle removal", ctx_a "A man is sitting on a
        # roof.", ctx_b "he"; built-in query: label + ": " + ctx_a + " " + ctx_b.capitalize()
        assert head == "Roof shingle removal: A man is sitting on a roof. he"
        return "Roof shingle removal: A man is sitting on a roof. He", int(gold), endings
    if name == "piqa":
        r = _first_jsonl("piqa/valid.jsonl")
        label = int(_first_label("piqa/valid-labels.lst"))
        return f"Question: {r['goal']}\nAnswer:", label, [r["sol1"], r["sol2"]]
    if name == "winogrande":
        r = _first_jsonl("winogrande/dev.jsonl")
        cut = r["sentence"].index("_")
        choices = [r["sentence"][:cut] + r["option1"], r["sentence"][:cut] + r["option2"]]
        return {"1": 0, "2": 1}[r["answer"]], r["sentence"][cut + 1 :].strip(), choices
    if name in ("arc_easy", "arc_challenge"):
        subset = "Easy" if name == "arc_easy" else "Challenge"
        r = _first_jsonl(f"arc/ARC-{subset}-Test.jsonl")
        labels = [c["label"] for c in r["question"]["choices"]]
        texts = [c["text"] for c in r["question"]["choices"]]
        stem = r["question"]["stem"]
        return f"Question: {stem}\nAnswer:", labels.index(r["answerKey"]), texts
    if name == "sciq":
        with open(DATA / "sciq/test.json", encoding="utf-8") as fh:
            r = json.load(fh)[0]
        text = f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:"
        choices = [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]]
        return text, 3, choices
    if name == "openbookqa":
        r = _first_jsonl("openbookqa/test.jsonl")
        labels = [c["label"] for c in r["question"]["choices"]]
        texts = [c["text"] for c in r["question"]["choices"]]
        return r["question"]["stem"], labels.index(r["answerKey"].lstrip()), texts
    if name == "boolq":
        r = _first_jsonl("boolq/dev.jsonl")
        # SuperGLUE's passage is "title -- passage"
        assert r["title"] == "Ethanol fuel"
        text = f"{r['title']} -- {r['passage']}\nQuestion: {r['question']}?\nAnswer:"
        return text, int(r["answer"]), ["no", "yes"]
    raise AssertionError(name)


# --- per-task tests -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", TASK_NAMES)
def test_doc_count(tasks: dict[str, Any], name: str) -> None:
    assert len(tasks[name].eval_docs) == COUNTS[name]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_first_doc_matches_builtin(tasks: dict[str, Any], name: str) -> None:
    task = tasks[name]
    doc = task.eval_docs[0]
    text, target, choices = expected_first(name)
    assert task.doc_to_text(doc) == text
    assert task.doc_to_target(doc) == target
    if choices is None:
        assert task.config.doc_to_choice is None
    else:
        assert task.doc_to_choice(doc) == choices
    assert set(task._metric_fn_list) == METRICS[name]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_requests(tasks: dict[str, Any], name: str) -> None:
    task = tasks[name]
    task.build_all_requests(limit=3)
    instances = task.instances
    assert {i.request_type for i in instances} == {"loglikelihood"}
    assert {i.doc_id for i in instances} == {0, 1, 2}
    first = sorted((i for i in instances if i.doc_id == 0), key=lambda i: i.idx)
    text, target, choices = expected_first(name)
    if name == "lambada_openai":
        expected = [(text, target)]
    elif name == "winogrande":  # partial scoring: one context per option, shared continuation
        expected = [(c, " " + target) for c in choices]
    else:
        expected = [(text, " " + c) for c in choices]
    assert [i.arguments for i in first] == expected


# --- equivalence with the installed built-in definitions ----------------------------------------
# keys that differ by design: the data source and split layout, and the tags
_SOURCE_KEYS = {
    "dataset_path",
    "dataset_name",
    "dataset_kwargs",
    "training_split",
    "validation_split",
    "test_split",
    "fewshot_split",
    "tag",
}


def _builtin_cfg(name: str) -> dict[str, Any]:
    return load_yaml(BUILTIN / BUILTIN_YAML[name], resolve_func=True)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_yaml_matches_builtin(out_dir: Path, name: str) -> None:
    ours = load_yaml(out_dir / f"{name}.yaml", resolve_func=True)
    builtin = _builtin_cfg(name)
    assert ours["dataset_path"] == "json"
    assert ours.get("tag") is None
    assert {k for k in ours if k not in _SOURCE_KEYS} == {
        k for k in builtin if k not in _SOURCE_KEYS
    }
    for key, value in builtin.items():
        if key in _SOURCE_KEYS:
            continue
        if callable(value):  # copied helper: same source code
            assert inspect.getsource(ours[key]) == inspect.getsource(value), key
        else:
            assert ours[key] == value, key
    # the evaluated split (test if there is one, else validation) is the built-in's
    assert ours.get("test_split") == builtin.get("test_split")
    if not builtin.get("test_split"):
        assert ours["validation_split"] == builtin["validation_split"]
    for split, path in ours["dataset_kwargs"]["data_files"].items():
        assert Path(path).is_absolute() and Path(path).is_file(), (split, path)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_builtin_definition_on_our_data_renders_identically(
    tasks: dict[str, Any], out_dir: Path, name: str
) -> None:
    """The installed built-in YAML, pointed at the converted files, gives the same docs/prompts."""
    ours = tasks[name]
    generated = load_yaml(out_dir / f"{name}.yaml", resolve_func=False)
    cfg = _builtin_cfg(name)
    cfg.pop("tag", None)
    cfg.update(
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs=generated["dataset_kwargs"],
        training_split=generated.get("training_split"),
        validation_split=generated.get("validation_split"),
        test_split=generated.get("test_split"),
    )
    builtin = ConfigurableTask(config=cfg)
    ours_docs, builtin_docs = list(ours.eval_docs), list(builtin.eval_docs)
    assert len(ours_docs) == len(builtin_docs) == COUNTS[name]
    assert ours_docs == builtin_docs  # incl. hellaswag's process_docs output, on every doc
    step = max(1, len(ours_docs) // 250)  # rendering every doc would take ~25 s
    for a, b in zip(ours_docs[::step], builtin_docs[::step]):
        assert ours.doc_to_text(a) == builtin.doc_to_text(b)
        assert ours.doc_to_target(a) == builtin.doc_to_target(b)
        if cfg.get("doc_to_choice") is not None:
            assert ours.doc_to_choice(a) == builtin.doc_to_choice(b)


# --- HellaSwag reconstruction against official records -------------------------------------------
# The first records of the official hellaswag_val.jsonl (rowanz/hellaswag), as quoted publicly;
# index = position in the validation split.
OFFICIAL_HELLASWAG = {
    0: {
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "endings": [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
        "label": 3,
    },
    1: {
        "activity_label": "Clean and jerk",
        "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.",
        "ctx_b": "the lady",
        "endings": [
            "swings and lands in her arms.",
            "pulls the barbell forward.",
            "pulls a rope attached to the barbell.",
            "stands and lifts the weight over her head.",
        ],
        "label": 3,
    },
    2: {
        "activity_label": "Canoeing",
        "ctx_a": "Two women in a child are shown in a canoe while a man pulls the canoe while "
        "standing in the water, with other individuals visible in the background.",
        "ctx_b": "the child and a different man",
        "endings": [
            "are then shown paddling down a river in a boat while a woman talks.",
            "are driving the canoe, they go down the river flowing side to side.",
            "sit in a canoe while the man paddles.",
            "walking go down the rapids, while the man in his helicopter almost falls and goes "
            "out of canoehood.",
        ],
        "label": 2,
    },
    8: {
        "activity_label": "Sharpening knives",
        "ctx_a": "A man is holding a pocket knife while sitting on some rocks in the wilderness.",
        "ctx_b": "then he",
        "endings": [
            "opens a can of oil put oil on the knife, and puts oil on a knife and press it "
            "through a can filled with oil then cuts several pieces from the sandwiches.",
            "takes a small stone from the flowing river and smashes it on another stone.",
            "uses the knife to shave his leg.",
            "sand the rocks and tops them by using strong pressure.",
        ],
        "label": 1,
    },
}


def _builtin_hellaswag_utils() -> Any:
    spec = importlib.util.spec_from_file_location(
        "builtin_hellaswag_utils", BUILTIN / "hellaswag" / "utils.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hellaswag_matches_builtin_on_official_records(tasks: dict[str, Any]) -> None:
    import datasets

    rows = list(OFFICIAL_HELLASWAG.values())
    official = datasets.Dataset.from_list(
        [{**r, "ctx": r["ctx_a"] + " " + r["ctx_b"], "label": str(r["label"])} for r in rows]
    )
    expected = list(_builtin_hellaswag_utils().process_docs(official))
    docs = tasks["hellaswag"].eval_docs
    for index, exp in zip(OFFICIAL_HELLASWAG, expected):
        doc = docs[index]
        assert (doc["query"], doc["choices"], doc["gold"]) == (
            exp["query"],
            exp["choices"],
            exp["gold"],
        )
        assert (doc["ctx_a"], doc["ctx_b"]) == (exp["ctx_a"], exp["ctx_b"])


def test_split_hellaswag_ctx() -> None:
    # ActivityNet: ctx_b is the unfinished sentence after the last sentence end
    assert split_hellaswag_ctx("A man is sitting on a roof. he") == (
        "A man is sitting on a roof.",
        "he",
    )
    assert split_hellaswag_ctx('He says "hi!" the man') == ('He says "hi!"', "the man")
    assert split_hellaswag_ctx("the boy") == ("", "the boy")
    # WikiHow (already cleaned up): ctx_b is ""
    wikihow = "How to make a liquid into a solid. Place a small open container in the freezer."
    assert split_hellaswag_ctx(wikihow) == (wikihow, "")
    assert split_hellaswag_ctx("") == ("", "")


def test_hellaswag_ctx_split_counts() -> None:
    docs = convert_task("hellaswag", DATA)["validation"]
    with_b = [d for d in docs if d["ctx_b"]]
    assert len(with_b) == 3243  # ActivityNet items; the other 6,799 are WikiHow
    assert all(d["ctx_a"] + " " + d["ctx_b"] == d["ctx"] for d in with_b)
    assert all(d["ctx_a"] == d["ctx"] for d in docs if not d["ctx_b"])


# --- other conversion details --------------------------------------------------------------------
def test_arc_numeric_answer_keys(tasks: dict[str, Any]) -> None:
    task = tasks["arc_easy"]
    docs = list(task.eval_docs)
    numeric = [d for d in docs if d["answerKey"].isdigit()]
    assert numeric, "ARC-Easy test has items labelled 1-4"
    for doc in numeric:
        assert task.doc_to_target(doc) == doc["choices"]["label"].index(doc["answerKey"])


def test_fewshot_context_offline(tasks: dict[str, Any]) -> None:
    """Few-shot contexts build offline and never contain the evaluated document itself."""
    assert {"lambada_openai", "arc_easy", "arc_challenge"} == FEWSHOT_AS_BUILTIN
    for name in ("hellaswag", "openbookqa", "arc_easy"):
        task = tasks[name]
        task.set_fewshot_seed(1234)
        doc = task.eval_docs[0]
        context = task.fewshot_context(doc, 3)
        question = task.doc_to_text(doc)
        assert context.endswith(question)
        assert context.count(question) == 1, name


# --- preparation behaviour ------------------------------------------------------------------------
def test_included_tasks_override_builtins(out_dir: Path) -> None:
    manager = TaskManager(include_path=str(out_dir), include_defaults=True)
    for name in TASK_NAMES:
        assert Path(manager.task_index[name].yaml_path).parent == out_dir, name
    # a built-in that is not ours is still there, and built-in tags resolve to our tasks
    assert "lambada_standard" in manager.task_index
    assert {"arc_easy", "arc_challenge"} <= manager.task_index["ai2_arc"].tags


def test_task_manager_only_ours_by_default(tmp_path: Path) -> None:
    manager = task_manager(DATA, tmp_path, ["piqa"])
    assert manager.all_subtasks == ["piqa"]
    assert (tmp_path / "piqa.yaml").is_file() and (tmp_path / "utils.py").is_file()


def test_prepare_is_idempotent(tmp_path: Path) -> None:
    out = prepare_tasks(DATA, tmp_path, ["winogrande", "boolq"])
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {
        "winogrande.yaml",
        "boolq.yaml",
        "utils.py",
        "winogrande.validation.jsonl",
        "boolq.validation.jsonl",
    }
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    prepare_tasks(DATA, tmp_path, ["boolq", "winogrande"])
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before


def test_missing_file_names_task_and_path(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "piqa").mkdir(parents=True)
    shutil.copy(DATA / "piqa" / "valid.jsonl", data / "piqa" / "valid.jsonl")
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"piqa: .*valid-labels\.lst"):
        prepare_tasks(data, out, ["piqa"])
    with pytest.raises(FileNotFoundError, match=r"hellaswag: .*hellaswag_val_full\.txt\.bz2"):
        prepare_tasks(tmp_path / "nowhere", out, ["hellaswag"])
    assert not out.exists()  # nothing written when a file is missing


def test_optional_splits_may_be_missing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "arc").mkdir(parents=True)
    shutil.copy(DATA / "arc" / "ARC-Easy-Test.jsonl", data / "arc" / "ARC-Easy-Test.jsonl")
    out = prepare_tasks(data, tmp_path / "out", ["arc_easy"])
    cfg = load_yaml(out / "arc_easy.yaml", resolve_func=False)
    assert cfg["test_split"] == "test"
    assert "training_split" not in cfg and "validation_split" not in cfg
    assert set(cfg["dataset_kwargs"]["data_files"]) == {"test"}


def test_unknown_task_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mmlu"):
        prepare_tasks(DATA, tmp_path, ["mmlu"])
