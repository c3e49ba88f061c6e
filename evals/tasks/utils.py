"""Python helpers referenced by the offline task YAMLs as ``!function utils.<name>``.

``prepare_tasks`` copies this file next to the generated YAMLs (lm-eval resolves
``!function utils.x`` relative to the YAML's folder). The functions are verbatim copies of
lm-eval 0.4.13's built-in task code (MIT licence, EleutherAI), so the offline tasks build the
same prompts as the built-in ones:

* ``preprocess`` / ``process_docs``: ``lm_eval/tasks/hellaswag/utils.py``
* ``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice``:
  ``lm_eval/tasks/winogrande/preprocess_winogrande.py``

``tests/test_eval_tasks.py`` checks them against the installed built-ins on every record.
Keep this module free of imports from the ``evals`` package: it is loaded from a copy.
"""

import re

import datasets


# --- hellaswag (lm_eval/tasks/hellaswag/utils.py) -------------------------------------------
def preprocess(text):
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    def _process_doc(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        out_doc = {
            "query": preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }
        return out_doc

    return dataset.map(_process_doc)


# --- winogrande (lm_eval/tasks/winogrande/preprocess_winogrande.py) -------------------------
def doc_to_text(doc):
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]
