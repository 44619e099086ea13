"""Rewards: RWML's next-state reward in an embedding space, its ROUGE variant, and task success.

RWML (Yu et al., arXiv 2602.05842; docs/methods.md section 2.3, eqs. 18-19) trains the agent model to
predict the next observation, and rewards a prediction by how close it lands to the real one in a
frozen sentence-embedding space E:

    s_hat = the text inside the last <next_state> ... </next_state>,           (missing: r = 0)
            cut to its first 100 tokens (the embedder's) as the RWML authors' code cuts it
    d = 1 - cos(E(s_hat), E(s_{t+1}))       s_hat a document, s_{t+1} a query (Qwen3-Embedding: with an instruction)
    r = 1.0 if d <= tau_d else 0.0         methods.md eq. 18: binary, more robust and less hackable than cos
    r = round(ROUGE-L F1(s_hat, s_{t+1}) / 0.2) * 0.2   eq. 19: structured tool responses (tau2-bench)
    r -= 0.1 [no <think> span of > 16 tokens] + 0.5 [wrong task status]     the authors' tau2 penalties, off here
    r = the score in the JSON object an LLM judge answers to `judge_prompt`   the paper's ablation (methods.md 2.8)

Policy RL afterwards uses the environment's own return, the sum of its step rewards (eq. 1,
`rollout.Trajectory.total_reward`: the success reward when the episode is won, plus the game's invalid-action
and step penalties); the two are never mixed. Every reward here is a pure function of texts (and a frozen
embedder) to floats; the LLM judge's is a function of the judge's answer, which rwml.judge_scorer samples.

E comes in as an argument: anything with `embed(texts, max_tokens)` and `embed_queries(texts)` returning [n, dim]
unit vectors (`Embedder`). The project's two, a BERT sentence embedder (all-MiniLM-L6-v2, the offline default) and
the paper's Qwen3-Embedding (a decoder's last-token state), are machinery: `engine/embedders.py`.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Callable, Protocol, Sequence

import numpy as np


# --------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------


BLOCKS = ("last", "one")  # which <next_state> span is the prediction (extract_tag)


def extract_tag(text: str, tag: str = "next_state", block: str = "last") -> str | None:
    """The stripped prediction inside <tag>...</tag> in `text`; None where there is none to score.

    block "last" (the default, as the RWML authors' public reward code reads it): the text between the last opening
    tag and the last closing tag; None when either is missing or the last closing tag comes before the last opening
    one (an unclosed final block). block "one" (the project's earlier choice, a setting): exactly one opening and one
    closing tag, None otherwise: a world model must commit to one prediction, and rewarding any of several would
    reward hedging. The paper is silent. Either way a span that is empty after stripping is None: nothing to score.
    """
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, not {block!r}")
    opening, closing = f"<{tag}>", f"</{tag}>"
    if block == "one" and (text.count(opening) != 1 or text.count(closing) != 1):
        return None
    start, end = text.rfind(opening), text.rfind(closing)
    if start < 0 or end < start + len(opening):
        return None
    return text[start + len(opening):end].strip() or None


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - cos(a, b) along the last axis, in float64 (vectors need not be normalised): d of methods.md eq. 18."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
    return 1.0 - np.sum(a * b, axis=-1) / norms


class Embedder(Protocol):
    def embed(self, texts: Sequence[str], max_tokens: int | None = None) -> np.ndarray:
        """[len(texts), dim] float32 unit vectors of the texts as documents (the predictions), each cut to its first
        max_tokens tokens (the embedder's own) first; None: no cut but the embedder's maximum length."""
        ...

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32 unit vectors of the texts as queries (the true next states): with the instruction
        the embedder was trained to read in front of a query (Qwen3-Embedding), or as documents (MiniLM)."""
        ...


PREDICTION_TOKENS = 100  # the RWML authors' code cuts the prediction to its first 100 tokens before embedding it


def embed_each_once(texts: Sequence[str], embed) -> dict[str, np.ndarray]:
    """{text: embed(text)} with every distinct text embedded once, all in one call: a GRPO group's rollouts share one
    target, and repeated predictions are common."""
    distinct = list(dict.fromkeys(texts))
    return dict(zip(distinct, embed(distinct))) if distinct else {}


def binary_rewards(distances: np.ndarray, tau_d: float) -> np.ndarray:
    """RWML eq. 18: 1.0 where the distance d = 1 - cos is at most tau_d, else 0.0, float32.

    Ties are rewarded: the RWML authors' code rewards a cosine similarity of at least 0.8, and 1 - s <= tau_d is
    s >= 1 - tau_d; in float64 1 - s is exact for s in [0.5, 1], so tau_d = 0.2 draws their line to the last bit.
    """
    return np.where(np.asarray(distances, np.float64) <= tau_d, 1.0, 0.0).astype(np.float32)


def next_state_rewards(responses: Sequence[str], targets: Sequence[str], embedder: Embedder, tau_d: float,
                       tag: str = "next_state", block: str = "last",
                       prediction_tokens: int = PREDICTION_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """RWML's binary cosine reward, methods.md eq. 18, for a batch: (rewards [n], distances [n]), both float32.

    responses: the world model's full outputs; the prediction is `extract_tag(response, tag, block)`, cut to its
    first prediction_tokens tokens of the embedder's tokenizer before it is embedded (0: not cut), as the RWML
    authors' code cuts it, and embedded as a document. targets: the true next observations, embedded as queries
    (Embedder.embed_queries), never cut. r = 1.0 if 1 - cos(E(prediction), E(target)) <= tau_d else 0.0
    (binary_rewards). A response without a usable tag gets reward 0 and distance 1.0 and is not embedded, nor is its
    target.
    """
    if len(responses) != len(targets):
        raise ValueError(f"{len(responses)} responses but {len(targets)} targets: pass one target per response")
    if prediction_tokens < 0:
        raise ValueError(f"prediction_tokens is {prediction_tokens}: the tokens a prediction keeps, 0 for all")
    predictions = [extract_tag(response, tag, block) for response in responses]
    scored = [i for i, prediction in enumerate(predictions) if prediction is not None]
    predicted = embed_each_once([predictions[i] for i in scored],
                                lambda texts: embedder.embed(texts, max_tokens=prediction_tokens or None))
    wanted = embed_each_once([targets[i] for i in scored], embedder.embed_queries)
    distances = np.ones(len(responses), np.float64)  # compared with tau_d in float64: float32(0.4) > 0.4
    rewards = np.zeros(len(responses), np.float32)
    for i in scored:
        distances[i] = cosine_distance(predicted[predictions[i]], wanted[targets[i]])
    rewards[scored] = binary_rewards(distances[scored], tau_d)
    return rewards, distances.astype(np.float32)


@functools.cache
def rouge_l_scorer():
    """rouge-score's ROUGE-L with Porter stemming, as the RWML authors' tau2-bench reward builds it (imported when
    first used: it brings NLTK's stemmer)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1, the F of methods.md eq. 19, as the `rouge-score` package computes it: both texts lowercased, every
    run of characters other than a-z and 0-9 a space, words longer than 3 letters Porter-stemmed; l the length of
    the longest common subsequence of the words, P = l / |pred|, R = l / |ref|, F = 2PR / (P + R); 0 when either
    text has no word."""
    return rouge_l_scorer().score(target=reference, prediction=prediction)["rougeL"].fmeasure


def rouge_reward(prediction: str, reference: str, step: float = 0.2) -> float:
    """RWML's reward for structured tool responses, methods.md eq. 19: ROUGE-L F1 rounded to a multiple of `step` as
    the RWML authors' code rounds it, round(F / step) * step.

    Python's round sends an exact half step to the even multiple (F 0.5 -> 0.4, F 0.9 -> 0.8). An F that is a half
    step in exact arithmetic may not be one in floating point (0.3 / 0.2 is 1.4999..., so F 0.3 -> 0.2); like the
    authors' code, this rounds the float it has. The result is the float their expression gives (3 * 0.2 is
    0.6000000000000001).
    """
    return round(rouge_l_f1(prediction, reference) / step) * step


def rouge_rewards(responses: Sequence[str], targets: Sequence[str], step: float = 0.2,
                  tag: str = "next_state", block: str = "last") -> np.ndarray:
    """`rouge_reward` (methods.md eq. 19) of each response's <tag> prediction against its target; a missing tag
    scores 0. [n] float32."""
    if len(responses) != len(targets):
        raise ValueError(f"{len(responses)} responses but {len(targets)} targets: pass one target per response")
    predictions = [extract_tag(response, tag, block) for response in responses]
    return np.array([0.0 if p is None else rouge_reward(p, t, step) for p, t in zip(predictions, targets)], np.float32)


# --------------------------------------------------------------------------------------------
# The RWML authors' tau2-bench penalties: settings, off by default as in their ALFWorld script
# --------------------------------------------------------------------------------------------


THINKING_TOKENS = 16  # a response thinks when its <think> span has more tokens than this
TASK_STATUSES = ("successfully completed", "not yet completed", "failed")  # the statuses their next states state


def thinks(response: str, count_tokens: Callable[[str], int], more_than: int = THINKING_TOKENS) -> bool:
    """Whether the response reasons before it predicts, as the authors' tau2-bench reward decides it: the text from
    its first <think> to its first </think>, unstripped, has more than `more_than` tokens (count_tokens). No span
    (either tag missing, or the first closing tag before the first opening one) does not think."""
    start, end = response.find("<think>"), response.find("</think>")
    if start < 0 or end < start:
        return False
    return count_tokens(response[start + len("<think>"):end]) > more_than


def task_status(text: str) -> str | None:
    """The task status a text states: the first of TASK_STATUSES it contains (case-sensitive, in that order, as the
    authors' code reads a reference), or None."""
    return next((status for status in TASK_STATUSES if status in text), None)


def states_task_status(prediction: str | None, reference: str) -> bool:
    """Whether the prediction's last line states the reference's task status and no other, as the authors' tau2-bench
    reward checks it. The last line is that of the stripped prediction; a missing prediction states none. A reference
    that states no status is an error: there is nothing to get right."""
    wanted = task_status(reference)
    if wanted is None:
        raise ValueError(f"the true next state {reference[:80]!r} states no task status ({' / '.join(TASK_STATUSES)}), "
                         "so a prediction cannot get it right. Fix: leave --wm-status-penalty at 0 for an environment "
                         "whose observations do not end in a task status (none here do).")
    lines = prediction.strip().splitlines() if prediction else []
    if not lines:
        return False
    return wanted in lines[-1] and not any(other in lines[-1] for other in TASK_STATUSES if other != wanted)


def penalties(responses: Sequence[str], targets: Sequence[str], count_tokens: Callable[[str], int] | None,
              no_thinking: float = 0.0, wrong_status: float = 0.0, tag: str = "next_state",
              block: str = "last") -> np.ndarray:
    """What the RWML authors' tau2-bench reward subtracts from each response's reward, [n] float32: no_thinking when
    the response does not think (`thinks`, tokens by count_tokens), wrong_status when its prediction (`extract_tag`,
    uncut) does not state its target's task status (`states_task_status`). A penalty of 0 is not checked."""
    if len(responses) != len(targets):
        raise ValueError(f"{len(responses)} responses but {len(targets)} targets: pass one target per response")
    total = np.zeros(len(responses), np.float32)
    for i, (response, target) in enumerate(zip(responses, targets)):
        if no_thinking and not thinks(response, count_tokens):
            total[i] += no_thinking
        if wrong_status and not states_task_status(extract_tag(response, tag, block), target):
            total[i] += wrong_status
    return total


# --------------------------------------------------------------------------------------------
# The LLM-judge reward: the RWML paper's ablation (judge rewards are hacked by vague predictions)
# --------------------------------------------------------------------------------------------


JUDGE_RUBRIC = "\n".join([  # one line a criterion
    "Grade the predicted next observation against the actual one, on four criteria:",
    "1. Coverage, up to 0.2: the share of the important changes the action made (as the actual next observation shows "
    "them) that the prediction contains.",
    "2. Specificity, up to 0.4: whether the prediction states those changes in concrete detail. A vague or generic "
    "statement that would fit many outcomes earns nothing here, even when it is not false.",
    "3. Confidence, up to 0.2: whether the prediction states its correct changes plainly, without hedging between "
    "outcomes. A change stated confidently and wrongly earns 0 here.",
    "4. Task status, up to 0.2: whether the prediction gets right if the task is now completed, not yet completed or "
    "failed.",
    "The score is the sum of the four, a number from 0 to 1. Answer with one JSON object and nothing else, in this "
    "form:",
    '{"coverage": <number>, "specificity": <number>, "confidence": <number>, "status": <number>, "score": <their sum>}'])


def judge_prompt(task: str, state: str, action: str, prediction: str, actual: str) -> str:
    """What the LLM judge reads (methods.md section 2.8): the task, the observation the action was taken in, the
    action, the predicted and the actual next observation, then the rubric (coverage of the important changes,
    specificity, confidence, the task's completion status) and the JSON answer it asks for."""
    return (f"You grade a world model: a model that read an agent's observation of an environment and the action the "
            f"agent took, and predicted the observation the environment shows next.\n"
            f"The agent's task: {task}\n"
            f"The observation: {state}\n"
            f"The agent's action: {action}\n"
            f"The predicted next observation: {prediction}\n"
            f"The actual next observation: {actual}\n"
            f"{JUDGE_RUBRIC}")


def judge_score(answer: str) -> float | None:
    """The score a judge's answer gives, or None where it gives none (a parse failure, which scores 0).

    The answer must hold exactly one JSON object, found scanning left to right from each "{" (an object nested in
    another is part of it; one inside a malformed object counts on its own); text around it is ignored (a "<json>" wrapper, a code fence, "Here is my grade:").
    Its "score" must be a JSON number (not a string, not true/false, not NaN or infinity) in [0, 1]. None for
    anything else: no object; several objects (which would be the grade is not clear); a score outside [0, 1], which
    is not clipped (a judge that answers 7 misread the scale, perhaps as 0-10, and clipping would give it full marks;
    the RWML authors' parser clips). Never raises.
    """
    decoder, found, position = json.JSONDecoder(), [], answer.find("{")
    while position >= 0:
        try:
            value, end = decoder.raw_decode(answer, position)
        except (ValueError, RecursionError):  # not JSON from here (RecursionError: absurdly deep nesting)
            position = answer.find("{", position + 1)
            continue
        found.append(value)
        position = answer.find("{", end)
    if len(found) != 1 or not isinstance(found[0], dict):
        return None
    score = found[0].get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return None
    return float(score) if 0 <= score <= 1 else None
