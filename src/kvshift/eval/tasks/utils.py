"""`!function` hooks of the task YAMLs beside this file: data loaders and prompt formatting.

Formulations follow lm-evaluation-harness's own tasks (lambada_openai, hellaswag, piqa, winogrande,
arc_easy/arc_challenge, mmlu); only the data source differs.
"""

from __future__ import annotations

import re

from kvshift.eval import data


def _dd(**splits):
    from datasets import DatasetDict  # optional: comes with lm-eval (the eval extra)

    return DatasetDict(splits)


# ---- custom_dataset loaders: called as f(**metadata, **dataset_kwargs) ----------------------------
def load_lambada(**_):
    from datasets import Dataset  # optional: comes with lm-eval (the eval extra)

    return _dd(test=Dataset.from_list(data.lambada_records()))


def load_split(source: str = "", **_):
    return _dd(validation=data.load_arrow(source))


def load_mmlu(shots: int = 0, **_):
    """MMLU test over all 57 subjects as one task. Each document carries its prompt prefix: the
    subject's description and, for shots > 0, the subject's first `shots` dev questions with answers
    (lm-eval's mmlu: description + first_n few-shot examples from the dev split)."""
    test, dev = data.load_mmlu("test"), data.load_mmlu("dev")
    by_subject: dict[str, list[dict]] = {}
    for d in dev:
        by_subject.setdefault(d["subject"], []).append(d)
    prefixes = {}
    for subject in {d for d in test["subject"]}:
        shots_text = "".join(mmlu_question(d) + " " + "ABCD"[d["answer"]] + "\n\n"
                             for d in by_subject.get(subject, [])[:shots])
        prefixes[subject] = (f"The following are multiple choice questions (with answers) about "
                             f"{subject.replace('_', ' ')}.\n\n" + shots_text)
    return _dd(test=test.map(lambda d: {"prefix": prefixes[d["subject"]]}))


def mmlu_question(doc) -> str:
    c = doc["choices"]
    return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def mmlu_doc_to_text(doc) -> str:
    return doc["prefix"] + mmlu_question(doc)


# ---- hellaswag (lm-eval's preprocessing) -----------------------------------------------------------
def _hs_clean(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # WikiHow artifacts
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset):
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _hs_clean(doc["activity_label"] + ": " + ctx),
                "choices": [_hs_clean(e) for e in doc["endings"]], "gold": int(doc["label"])}

    return dataset.map(one)


# ---- winogrande (lm-eval's partial scoring: two contexts, one shared continuation) -----------------
def winogrande_doc_to_text(doc) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]
