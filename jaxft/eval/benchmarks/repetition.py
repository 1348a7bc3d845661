"""`repetition`: how much a model repeats itself, on any prompt set (DeepSeek LLM, section 5.5:
the repetition ratio of greedy generations, which their DPO stage lowered).

Records: {"prompt": str | messages} or {"messages": [...]} (trailing assistant turns dropped:
a chat eval file works), or a benchmark's own {"question"} / {"problem"}. Nothing is judged
right or wrong, so no pass@k: the result is `repetition_ratio`, the mean over completions of the
share of word 3-grams that already appeared earlier in the same completion
(`jaxft.eval.metrics.repetition_ratio`), and `truncated`, the share that ran into
--max-new-tokens (a model caught in a loop never stops). Measured at temperature 0 as DeepSeek
did; another temperature is reported as given, with a warning.
"""

from __future__ import annotations

import logging
from typing import Sequence

from jaxft.eval.benchmarks import register
from jaxft.eval.benchmarks.base import EvalSettings, GenerationBenchmark, Problem, Verdict
from jaxft.eval.metrics import repetition_ratio

log = logging.getLogger(__name__)


def read_prompts(records: Sequence[dict], settings: EvalSettings) -> list[Problem]:
    from jaxft.data.data_error import DataError
    from jaxft.eval.generation import _prompt_of

    if settings.temperature != 0:
        log.warning("repetition: DeepSeek's repetition ratio is measured at temperature 0; reporting it at "
                    "--temperature %s", settings.temperature)
    problems = []
    for i, record in enumerate(records):
        where = record.get("_location", f"record {i}")
        fields = {k: v for k, v in record.items() if k != "_location"}
        if "prompt" not in fields and "messages" not in fields:
            text = next((fields[k] for k in ("question", "problem") if k in fields), None)
            if text is None:
                raise DataError(where, "needs a 'prompt', 'messages', 'question' or 'problem' field",
                                field="prompt")
            fields = {"prompt": text}
        prompt, problem = _prompt_of(fields, need_answer=False)
        if problem:
            raise DataError(where, problem, field="prompt")
        if not isinstance(prompt, str) and not settings.chat:
            raise DataError(where, "a message list needs the chat template (--chat)", field="messages")
        problems.append(Problem(str(record.get("id", i)), prompt, None, record))
    return problems


def judge_nothing(problems, completions) -> list[list[Verdict]]:
    return [[Verdict(None, False) for _ in texts] for texts in completions]


def repetition_metrics(problems, completions, sampled) -> dict[str, float]:
    return {"repetition_ratio": repetition_ratio([t for texts in completions for t in texts])}


REPETITION = register(GenerationBenchmark(
    name="repetition", description="DeepSeek's repetition ratio of greedy completions of any prompt set",
    read=read_prompts, judge=judge_nothing, default_data=None, max_new_tokens=256, chat=True, scored=False,
    metrics=repetition_metrics))
