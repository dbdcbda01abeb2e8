"""A tinkerkit GRADER for multiple-choice questions whose answers are the letters A to J.

Use it with ``tinkerkit eval --grader examples/multiple_choice_grader.py ...``, with
``tinkerkit train --grader ...`` (for SAMPLE_EVAL_EVERY), or with ``GRADER = "..."`` in the config.

The built-in grader expects a math answer: it finds ``\\boxed{C}`` and "The answer is C", but not
"**C**", "Answer: C" or a bare "(C)", and it compares "(C)" or "c" with the reference "C" as math
(math-verify reads letters as symbols). This file reads the chosen letter however a model writes
it, and compares letters. Each of these outputs is read as ``C``:

- ``The answer is C`` (more words may follow), ``the answer is (c).``, ``The correct option is C``;
  without such a phrase, ``which is option (C)``, ``I choose C``
- ``\\boxed{C}``, ``\\boxed{\\text{(C)}}``
- ``Answer: C``, ``**Answer:** (C) 42``
- ``**C**``, ``**(C)**``
- the whole output ``(C)``, ``C)``, ``C.`` or ``c``; an output that starts with an option label,
  ``C) 42, because ...``

A lowercase letter counts only where it cannot be the English word "a" ("the answer is a
number" is no answer). References may be written "C", "(C)" or "C) 42".

It defines ``extract_final_answer``, ``check_answer_exact_match``, ``check_answer_equivalent``
(the same letter comparison: math-verify is kept out) and ``check_answer_contains`` (the letter
appears as an option label anywhere; an upper bound, as the built-in's). It wraps the built-in
extractor, which is importable from a grader file.
"""

import re

from tinkerkit.grading import extract_final_answer as builtin_extract

LETTERS = "A-J"

# One letter, however it is wrapped: (C) C) [C] **C** $C$ \text{(C)} \textbf{C} C. C:
_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{|[\s*_`$(){}\[\].:]")
_OPTION_LABEL = re.compile(rf"^[\s*_`$]*(?:\(([{LETTERS}])\)|([{LETTERS}])[).:])(?:\s|$)",
                           re.IGNORECASE)
# "answer is C", "Answer: (C)", "the correct option is **c**": the last one counts. An upper-case
# letter may be followed by more words ("The answer is C because ..."); a lower-case one only by
# punctuation or the end, since "the answer is a number" is prose.
_LETTER_AFTER_MARKER = (rf"\W{{0,3}}(?:is|would be)?[\s*_`$:]*(?:\\text\s*\{{|\\boxed\s*\{{)?"
                        rf"[\s(\[*]*(?:(?-i:([{LETTERS}]))\b|([a-j])(?=[\s)\]}}*_`$]*(?:[.,;:!]|$)))")
_ANSWER = re.compile(r"\b(?:answer|(?:correct|right|best) (?:option|choice))\b"
                     + _LETTER_AFTER_MARKER, re.IGNORECASE | re.MULTILINE)
# Weaker, used only without an answer marker: "which is option (C)", "I choose A", "pick B".
_CHOICE = re.compile(r"\b(?:option|choice|choose|pick|select|go with)\b" + _LETTER_AFTER_MARKER,
                     re.IGNORECASE | re.MULTILINE)
_BOLD = re.compile(rf"\*\*\s*\(?([{LETTERS}])\)?\s*\*\*", re.IGNORECASE)
_STANDALONE = "(?<![A-Za-z]){}(?![A-Za-z])"


def letter_of(answer):
    """The letter an answer names ("(C)", "c", "\\text{(C)}", "C) 42"), or None."""
    stripped = _WRAPPERS.sub("", answer)
    if len(stripped) == 1 and re.fullmatch(f"[{LETTERS}]", stripped, re.IGNORECASE):
        return stripped.upper()
    label = _OPTION_LABEL.match(answer)
    return (label.group(1) or label.group(2)).upper() if label else None


def extract_final_answer(text):
    """The chosen letter, upper case, or None (see the module docstring for the forms)."""
    builtin = builtin_extract(text)  # \boxed{...}, #### ..., "the answer is ..."
    if builtin is not None and letter_of(builtin):
        return letter_of(builtin)
    for marker in (_ANSWER, _CHOICE):
        marked = list(marker.finditer(text))
        if marked:
            return (marked[-1].group(1) or marked[-1].group(2)).upper()
    bold = _BOLD.findall(text)
    if bold:
        return bold[-1].upper()
    lines = text.strip().splitlines()
    return letter_of(lines[0]) if lines else None


def check_answer_exact_match(pred, ref):
    """The extracted letter is the reference's letter."""
    letter = letter_of(pred)
    return letter is not None and letter == letter_of(ref)


def check_answer_equivalent(pred, ref):
    """Letters are not math: the same comparison as exact match (math-verify is not asked)."""
    return check_answer_exact_match(pred, ref)


def check_answer_contains(output, ref):
    """The reference letter appears anywhere as an upper-case option label: (C), C), or C alone."""
    letter = letter_of(ref)
    return letter is not None and re.search(_STANDALONE.format(letter), output) is not None
