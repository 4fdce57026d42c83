"""Prompt text for the explainer and the scorers (delphi-style wording, METHOD.md).

Layout for the prefix cache: everything that repeats across a latent's prompts (system prompt,
then the explanation) comes first; the window, which changes every prompt, comes last; the
assistant turn is forced to start with "[" so one generation step gives the answer digit.
"""

from __future__ import annotations

import numpy as np

MARK_FRACTION = 0.2  # tokens above this fraction of the window's max activation are marked

EXPLAINER_SYSTEM = """You are a meticulous AI researcher conducting an important investigation into patterns found in language. Your task is to analyze text and provide an explanation that thoroughly encapsulates possible patterns found in it.
Guidelines:
You will be given a list of text examples on which special words are selected and between delimiters like <<this>>. If a sequence of consecutive tokens all are important, the entire sequence of tokens will be contained between delimiters <<just like this>>. How important each token is for the behavior is listed after each example in parentheses, on a scale from 0 to 9.
- Produce a concise final description. Simply describe the text features that are common in the examples, and what patterns you found.
- If the examples are uninformative, you don't need to mention them. Don't focus on giving examples of important tokens, but try to summarize the patterns found in the examples.
- Do not mention the marker tokens (<< >>) in your explanation.
- Do not make lists of possible explanations. Keep your explanation short: one sentence.
- Your response must be the formatted explanation, using [EXPLANATION]:"""

EXPLANATION_PREFIX = "[EXPLANATION]:"

DETECTION_SYSTEM = """You are an intelligent and meticulous linguistics researcher.
You will be given a certain feature of text, such as "male pronouns" or "text with negative sentiment", and a text example. Decide whether the feature is present in the text example.
Answer [1] if the feature is present and [0] if it is not. Most text examples do not contain the feature."""

FUZZING_SYSTEM = """You are an intelligent and meticulous linguistics researcher.
You will be given a certain feature of text, such as "male pronouns" or "text with negative sentiment", and a text example in which some tokens are marked between delimiters <<like this>>.
Decide whether the marked tokens are correctly marked: whether they are the tokens where the feature is present.
Answer [1] if the marking is correct and [0] if it is not."""

ANSWER_PREFIX = "["
BINARY = ("0", "1")


def token_strings(tokenizer, ids) -> list[str]:
    """Each token id as its own text piece (subject tokenizer: a `tokenizers.Tokenizer`)."""
    return [tokenizer.decode([int(t)]) for t in ids]


def mark(pieces: list[str], marked: np.ndarray) -> str:
    """Joins pieces, putting each run of marked tokens between << >>."""
    out, inside = [], False
    for piece, m in zip(pieces, marked):
        if m and not inside:
            out.append("<<")
        if not m and inside:
            out.append(">>")
        out.append(piece)
        inside = bool(m)
    if inside:
        out.append(">>")
    return "".join(out).replace("\n", "\\n")


def marked_tokens(acts: np.ndarray) -> np.ndarray:
    top = acts.max()
    return (acts > MARK_FRACTION * top) & (acts > 0) if top > 0 else np.zeros_like(acts, bool)


def explainer_messages(examples: list[tuple[list[str], np.ndarray]]) -> list[dict]:
    """examples: (token pieces, activations) of each activating window."""
    lines = []
    for i, (pieces, acts) in enumerate(examples, 1):
        marked = marked_tokens(acts)
        scale = acts.max() if acts.max() > 0 else 1.0
        listing = ", ".join(f'("{pieces[j].strip() or pieces[j]}", {int(round(9 * acts[j] / scale))})'
                            for j in np.flatnonzero(marked))
        lines.append(f"Example {i}: {mark(pieces, marked)}\nActivations: {listing}")
    return [{"role": "system", "content": EXPLAINER_SYSTEM}, {"role": "user", "content": "\n\n".join(lines)}]


# delphi's SYSTEM_CONTRASTIVE idea in our wording: counter-examples come from the latents whose decoder
# directions are closest, so they show what this latent is *not* among features much like it.
EXPLAINER_CONTRASTIVE_SYSTEM = EXPLAINER_SYSTEM.replace(
    "\n- Produce a concise final description.",
    "\nAfter them come counter-examples: texts on which closely related features are active but this one is not "
    "(nothing is marked in them).\n- Produce a concise final description of what distinguishes the examples from "
    "the counter-examples.", 1)
COUNTER_EXAMPLES_HEADER = "Counter-examples (this feature is not active):"


def explainer_contrastive_messages(examples: list[tuple[list[str], np.ndarray]],
                                   counter: list[list[str]]) -> list[dict]:
    """The plain prompt's examples, then `counter` (token pieces of windows where the latent is silent)."""
    user = explainer_messages(examples)[1]["content"]
    lines = [f"Counter-example {i}: {mark(pieces, np.zeros(len(pieces), bool))}" for i, pieces in enumerate(counter, 1)]
    return [{"role": "system", "content": EXPLAINER_CONTRASTIVE_SYSTEM},
            {"role": "user", "content": "\n\n".join([user, COUNTER_EXAMPLES_HEADER, *lines])}]


def parse_explanation(text: str) -> str:
    """The explanation: the generated text after the forced prefix, up to the first blank line."""
    text = text.split(EXPLANATION_PREFIX)[-1].strip()
    first = text.split("\n\n")[0].strip()
    return " ".join(first.split())


def detection_messages(explanation: str, pieces: list[str]) -> list[dict]:
    return [{"role": "system", "content": DETECTION_SYSTEM},
            {"role": "user", "content": f"Feature explanation: {explanation}\n\n"
                                        f"Text example: {mark(pieces, np.zeros(len(pieces), bool))}"}]


def fuzzing_messages(explanation: str, pieces: list[str], marked: np.ndarray) -> list[dict]:
    return [{"role": "system", "content": FUZZING_SYSTEM},
            {"role": "user", "content": f"Feature explanation: {explanation}\n\nText example: {mark(pieces, marked)}"}]


# ---------------------------------------------------------------------------------- simulator

SIMULATOR_SYSTEM = """You are a meticulous linguistics researcher. You will be given an explanation of a feature of text and a text example whose last token is marked between delimiters <<like this>>.
Rate how much the marked last token represents the feature, with an integer from 0 to 9: 0 means the token has no relation to the feature, 9 means it is a strong and exact match.
Most tokens have no relation to the feature, so lower numbers are much more likely than higher ones; give 9 only for an exact match. Answer with a Python list holding the number, like [0]."""

DIGITS = tuple(str(d) for d in range(10))

# Three worked examples (explanation, window with the marked last token, rating), sent as chat
# turns after the system prompt: part of every prompt's shared prefix, so free under a prefix cache.
SIMULATOR_FEW_SHOT = (
    ("Years and dates in historical writing.", "The treaty was finally signed in the spring of <<1648>>", 9),
    ("Words about cooking and food.", "The committee postponed its decision until next <<Tuesday>>", 0),
    ('The word "the" and other articles before a noun.', "She walked slowly towards <<the>>", 6),
)


def simulator_user(explanation: str, window: str, order: str) -> str:
    """The user turn; `order` puts the explanation (reference layout) or the window first."""
    if order == "explanation_first":
        return f"Feature explanation: {explanation}\n\nText examples:\n\nExample 1: {window}"
    return f"Text examples:\n\nExample 1: {window}\n\nFeature explanation: {explanation}"


def simulator_messages(explanation: str, pieces: list[str], order: str) -> list[dict]:
    """The marked window is the last 32 tokens ending at the predicted position."""
    marked = np.zeros(len(pieces), bool)
    marked[-1] = True
    messages = [{"role": "system", "content": SIMULATOR_SYSTEM}]
    for expl, window, rating in SIMULATOR_FEW_SHOT:
        messages += [{"role": "user", "content": simulator_user(expl, window, order)},
                     {"role": "assistant", "content": f"[{rating}]"}]
    return messages + [{"role": "user", "content": simulator_user(explanation, mark(pieces, marked), order)}]


# ------------------------------------------------------------------- simulator, all at once

# One prompt per (latent, window): the window's tokens one per line, each followed by a tab and a
# rating slot (OpenAI's ALL_AT_ONCE layout). The worked example shows real ratings; the target lines
# show PLACEHOLDER, so no line conditions on the model's own guesses, and the digit distribution is
# read after every tab from one forward pass (prompt log-probs). The head (system prompt, worked
# example, explanation) is a prefix vLLM's cache serves (llm/vllm_engine.py reads it for prompt
# log-probs too), but an OpenAI-compatible server computes every prompt whole: it is kept short.
SIMULATOR_ALL_SYSTEM = """You are a meticulous linguistics researcher. You will be given an explanation of a feature of text, then a text, one token per line.
After each token write a tab and an integer from 0 to 9: how much that token represents the feature. 0 means no relation, 9 a strong and exact match. Most tokens have no relation to the feature, so 0 is by far the most common rating."""

PLACEHOLDER = "unknown"
SEPARATOR = "\t"

SIMULATOR_ALL_FEW_SHOT = ("Years and dates in historical writing.",
                          (("The", 0), (" treaty", 0), (" was", 0), (" signed", 0), (" in", 0), (" 16", 8),
                           ("48", 9), (",", 0), (" ending", 0), (" the", 0), (" war", 0), (".", 0)))


def line_text(piece: str) -> str:
    """A token as one line of the display: newlines and tabs escaped, so each token stays one line."""
    return piece.replace("\n", "\\n").replace("\t", "\\t")


def simulator_all_messages(explanation: str) -> list[dict]:
    """System prompt, the worked example, then the target's explanation; the assistant turn (the
    target's lines) is appended as token ids by rewrite.simulate.window_prompts."""
    expl, lines = SIMULATOR_ALL_FEW_SHOT
    answer = "".join(f"{line_text(t)}{SEPARATOR}{r}\n" for t, r in lines)
    return [{"role": "system", "content": SIMULATOR_ALL_SYSTEM},
            {"role": "user", "content": f"Feature explanation: {expl}"},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": f"Feature explanation: {explanation}"}]
