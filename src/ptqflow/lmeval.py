"""lm-eval (0.4) on an in-memory model: ptqflow's offline tasks and lm-eval's own.

ptqflow's tasks are task YAMLs shipped in ``ptqflow/lm_tasks/``, over items built from the
embedded held-out Wikipedia pool (``wiki:eval``; never the calibration half):

- ``wiki_ppl``: rolling log-likelihood of the first ``wiki_docs`` articles of the pool (each
  article one document, scored in windows of ``max_length`` tokens): word perplexity, byte
  perplexity and bits per byte.
- ``wiki_titles``: multiple choice over 4 real article titles. The text is the first sentence of
  an article from position :data:`TITLES_START` on (so the two tasks never share an article),
  with the article's name blanked out; the three wrong titles are drawn from the same articles
  with a fixed seed. Accuracy and length-normalised accuracy, with their standard errors.

:func:`write_tasks` writes the items as JSONL beside a copy of each YAML whose ``data_files``
is the absolute path (lm-eval resolves relative ones against the working directory). Any other
task name is looked up among lm-eval's standard tasks, whose data comes from the Hugging Face
hub: :func:`check_tasks` refuses an unknown name with the local tasks listed, and a standard
one with an "offline" error naming it when the hub cannot be reached, before any model loads.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ptqflow.sources import hub_reachable
from ptqflow.text import wiki_articles

TASK_YAMLS = Path(__file__).parent / "lm_tasks"
LOCAL_TASKS = ("wiki_ppl", "wiki_titles")
TITLES_START = 1000  # wiki_titles items start here in the eval pool; wiki_ppl stays below
_MAX_WORDS = 60  # longer first sentences are passed over (they cost more than they tell)
_BLANK = "___"


class OfflineTaskError(RuntimeError):
    """A standard lm-eval task was asked for and the Hugging Face hub cannot be reached."""


def wiki_ppl_docs(n: int) -> list[dict[str, str]]:
    """The first ``n`` articles of the held-out pool, one ``{"text": ...}`` document each."""
    if not 0 < n <= TITLES_START:
        raise ValueError(
            f"lm_eval.wiki_docs={n}: use 1..{TITLES_START}, so wiki_ppl and wiki_titles never "
            "score the same article"
        )
    return [{"text": text.strip()} for _, text in wiki_articles("eval")[:n]]


def _first_sentence(text: str) -> str:
    # A sentence ends at . ! or ? after two lowercase letters or digits, not after an initial.
    match = re.match(r"(.+?[a-z0-9)]{2}[.!?])(?:\s|$)", text.strip(), re.S)
    return " ".join((match.group(1) if match else text).split())


def _blank_name(sentence: str, title: str) -> str:
    """``sentence`` with the article's name blanked out: the title, the title without a
    parenthesised qualifier, and its part before a comma ("Paris, Texas" -> "Paris")."""
    bare = re.sub(r"\s*\(.*\)$", "", title)
    names = sorted({title, bare, bare.split(",")[0]}, key=len, reverse=True)
    for name in names:
        if len(name) >= 2:
            sentence = re.sub(re.escape(name), _BLANK, sentence, flags=re.I)
    return sentence


def wiki_title_items(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` items ``{"text", "choices" (4 titles), "label"}`` from the held-out pool."""
    articles = wiki_articles("eval")[TITLES_START:]
    candidates = []
    for title, text in articles:
        sentence = _blank_name(_first_sentence(text), title)
        if 5 <= len(sentence.split()) <= _MAX_WORDS:
            candidates.append((title, sentence))
    if n > len(candidates):
        raise ValueError(
            f"lm_eval.title_items={n}: the held-out pool has {len(candidates)} usable articles"
        )
    titles = sorted({t for t, _ in candidates})
    rng = random.Random(seed)
    items = []
    for title, sentence in candidates[:n]:
        wrong: list[str] = []
        while len(wrong) < 3:
            pick = rng.choice(titles)
            if pick.lower() != title.lower() and pick not in wrong:
                wrong.append(pick)
        label = rng.randrange(4)
        items.append({"text": sentence, "choices": [*wrong[:label], title, *wrong[label:]]})
        items[-1]["label"] = label
    return items


def write_tasks(
    task_dir: Path, tasks: Sequence[str], wiki_docs: int, title_items: int, seed: int
) -> dict[str, str]:
    """Write each local task among ``tasks`` (its items and its YAML) into ``task_dir``.

    Returns:
        ``{task: sha256 of its items file}``.
    """
    task_dir.mkdir(parents=True, exist_ok=True)
    builders = {
        "wiki_ppl": lambda: wiki_ppl_docs(wiki_docs),
        "wiki_titles": lambda: wiki_title_items(title_items, seed),
    }
    digests = {}
    for task in (t for t in tasks if t in LOCAL_TASKS):
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in builders[task]())
        data_file = task_dir / f"{task}.jsonl"
        data_file.write_text(data, encoding="utf-8")
        template = (TASK_YAMLS / f"{task}.yaml").read_text(encoding="utf-8")
        relative = f"test: {task}.jsonl"
        if relative not in template:
            raise RuntimeError(f"{TASK_YAMLS / task}.yaml no longer names '{relative}'")
        yaml_text = template.replace(relative, f"test: {json.dumps(str(data_file.resolve()))}")
        (task_dir / f"{task}.yaml").write_text(yaml_text, encoding="utf-8")
        digests[task] = "sha256:" + hashlib.sha256(data.encode("utf-8")).hexdigest()
    return digests


@functools.cache
def standard_tasks() -> frozenset[str]:
    """Every task and group name lm-eval ships (indexing them takes seconds: done once)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


def check_tasks(tasks: Sequence[str]) -> None:
    """Refuse, before any model loads, task names lm-eval does not know and standard tasks
    when the hub is unreachable.

    Raises:
        ValueError: an unknown name; the message lists the local tasks.
        OfflineTaskError: a standard task and no hub.
    """
    others = [t for t in tasks if t not in LOCAL_TASKS]
    if not others:
        return
    known = standard_tasks()
    unknown = [t for t in others if t not in known]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}: ptqflow's offline tasks are "
            f"{list(LOCAL_TASKS)}; any standard lm-eval task name works too when the hub is "
            "reachable (list them with `lm_eval ls tasks`)"
        )
    if not hub_reachable():
        raise OfflineTaskError(
            f"lm-eval task(s) {others} need their datasets from the Hugging Face hub, and this "
            "machine is offline (the hub cannot be reached, or HF_HUB_OFFLINE is set); use "
            f"ptqflow's offline tasks {list(LOCAL_TASKS)}, or run where the hub is reachable"
        )


def _figures(results: dict[str, Any], task: str) -> dict[str, float | int]:
    """``{"acc": ..., "acc_stderr": ..., "samples": n}`` from lm-eval's results of a task
    (metric keys are ``"<metric>,<filter>"``; a filter other than ``none`` joins the name)."""
    out: dict[str, float | int] = {}
    for key, value in results["results"][task].items():
        metric, _, filt = key.partition(",")
        if not filt or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        name = metric if filt == "none" else f"{metric}_{filt}"
        out[name] = round(float(value), 8) if math.isfinite(value) else float(value)
    out["samples"] = int(results["n-samples"][task]["effective"])
    return dict(sorted(out.items()))


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[str],
    task_dir: Path,
    batch_size: int,
    max_length: int,
    num_fewshot: int | None = None,
    limit: int | None = None,
) -> dict[str, dict[str, float | int]]:
    """Run lm-eval's ``tasks`` on ``model`` (an instance, wrapped in lm-eval's ``HFLM``),
    the local ones from ``task_dir`` (:func:`write_tasks`).

    Returns:
        ``{task: {metric: value, "<metric>_stderr": ..., "samples": n}}``.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.WARNING)
    local_only = all(t in LOCAL_TASKS for t in tasks)
    manager = TaskManager(include_path=str(task_dir), include_defaults=not local_only)
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=max_length,
        device=str(next(model.parameters()).device),
    )
    results = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        num_fewshot=num_fewshot,
        limit=limit,
        bootstrap_iters=1000,
        log_samples=False,
    )
    return {task: _figures(results, task) for task in tasks}
