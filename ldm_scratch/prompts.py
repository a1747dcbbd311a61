"""Prompts as people write them for AUTOMATIC1111's web UI: text → per-step texts → weighted 77-token chunks.

    "a [red:blue:0.5] (circle:1.3)"  ──schedule──▶  [(15, "a red (circle:1.3)"), (30, "a blue (circle:1.3)")]
    "a red (circle:1.3)"             ──weights──▶   [("a red ", 1.0), ("circle", 1.3)]
                                     ──chunks───▶   ids [k, 77] = BOS + 75 ids + EOS (padded),  weights [k, 77]

The text encoder then turns each chunk into [77, D] (conditioning.py), so a prompt of any length gives a context
[1, 77·k, D]. The numbers are the web UI's (its modules/prompt_parser.py and sd_hijack_clip.py, read, not copied):

- Emphasis: `(text)` ×1.1, `[text]` ÷1.1, `(text:w)` ×w; nesting multiplies, e.g. `((a))` = 1.1² = 1.21;
  an unclosed bracket closes at the end; `\\(` `\\)` `\\[` `\\]` `\\\\` are literal; neighbours of equal weight merge.
- `BREAK` (upper case, a whole word) ends the chunk: what follows starts a new 75-token chunk.
- Editing: `[from:to:when]` uses `from` up to step `when`, then `to`; `[to:when]` adds, `[from::when]` removes.
  `when` with a "." is a fraction of the steps (0.5 of 30 → step 15), without one a step number (as the current
  web UI reads it; older versions read any number below 1 as a fraction). Alternation `[a|b]` switches every
  step. A schedule entry (end, text) holds for the sampler's steps i ≤ end (i counts from 0 at the first step
  that runs, as the web UI's counter; img2img runs fewer steps than the schedule's), so `[a:b:15]` of 30 steps
  runs "a" for steps 0…15 (16 steps) and "b" for 16…29: the web UI's off-by-one, kept so that the same prompt
  gives the same image.
- Chunks: each weighted fragment is tokenized on its own; tokens fill chunks of 75; when a chunk is full and a
  comma lies within its last 20 tokens, the tokens after that comma move to the next chunk, so a phrase is not cut.
  A textual-inversion embedding of n vectors (n ids) is never cut: if it does not fit, it starts the next chunk.

Not supported: the web UI's `AND` (composable diffusion) and its `text:weight` suffix stay literal text.
`prompt_syntax="plain"` (pipeline.py) bypasses all of this and reads the prompt literally.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

CHUNK_LENGTH = 75               # ids per chunk; BOS and EOS make 77, CLIP's context length
COMMA_BACKTRACK = 20            # the web UI's default "comma_padding_backtrack"
ROUND, SQUARE = 1.1, 1 / 1.1    # (text) and [text] multipliers
BREAK_WEIGHT = -1.0             # the web UI's marker weight for a BREAK fragment

# ---------------------------------------------------------------------------------------------------------------
# 1. Emphasis: text → [(fragment, weight)]
# ---------------------------------------------------------------------------------------------------------------

# One token of the emphasis syntax per match, tried in this order (the web UI's alternatives):
_EMPHASIS_TOKEN = re.compile(r"""
    \\[()\[\]\\]            # an escaped bracket or backslash: literal
  | \\                      # a lone backslash: dropped (the web UI keeps what follows it as text)
  | [(\[]                   # an opening bracket
  | :\s*([+-]?[.\d]+)\s*\)  # ":1.3)" closes a round bracket with that weight
  | [)\]]                   # a closing bracket
  | [^\\()\[\]:]+           # plain text
  | :                       # a colon that is not a weight
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_weights(text: str) -> list[tuple[str, float]]:
    """The web UI's `parse_prompt_attention`: text → [(fragment, weight)], equal neighbours merged.

    `a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).` → a ×1, house ×1.573 (1.3·1.1·1.1), " " ×1.1, on ×1,
    " a " ×1.1, hill ×0.55, ", sun, " ×1.1, sky ×1.4641 (1.1⁴), "." ×1.1. A BREAK is the fragment ("BREAK", −1).
    The products are taken in the web UI's order (innermost bracket first), so the floats are bit-equal to its.
    """
    fragments: list[list] = []
    round_open: list[int] = []        # where each still-open bracket's fragments begin
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in _EMPHASIS_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0])
        elif token in "([":
            (round_open if token == "(" else square_open).append(len(fragments))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), _weight(weight, text))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE)
        else:                                     # text, or a bracket/colon with nothing to close: literal
            for k, part in enumerate(_BREAK.split(token)):
                if k > 0:
                    fragments.append(["BREAK", BREAK_WEIGHT])
                fragments.append([part, 1.0])
    for start in round_open:                      # unbalanced brackets close at the end
        multiply_from(start, ROUND)
    for start in square_open:
        multiply_from(start, SQUARE)
    return _merge_equal(fragments or [["", 1.0]])


def _weight(number: str, text: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise ValueError(f"{number!r} in the prompt {text!r} is not a weight: write (text:1.3), or escape the "
                         "brackets as \\( \\) to keep them literal (or use prompt_syntax='plain')") from None


def _merge_equal(fragments: list[list]) -> list[tuple[str, float]]:
    """Adjacent fragments of exactly equal weight become one: `(unnecessary)(parens)` → unnecessaryparens ×1.1."""
    merged = [list(fragments[0])]
    for text, weight in fragments[1:]:
        if weight == merged[-1][1]:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged]


# ---------------------------------------------------------------------------------------------------------------
# 2. Editing and alternation: text → [(end_at_step, text)]
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Scheduled:
    """`[before:after:when]`; before is None for `[after:when]`."""
    before: list | None
    after: list
    when: str                     # the number as written: "0.5" (a fraction), "10" (a step)


@dataclass
class Alternate:
    """`[a|b|…]`: option (step − 1) mod n at step ≥ 1."""
    options: list = field(default_factory=list)


_NUMBER_CLOSE = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")
_STOPS = set("[]():|\\")


class _ScheduleParser:
    """A recursive-descent reading of the web UI's schedule grammar (it uses a lark Earley parser):

        start:      (prompt | stray bracket or colon)*
        prompt:     (emphasized | scheduled | alternate | plain)*
        emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"      (kept as text)
        scheduled:  "[" [prompt ":"] prompt ":" NUMBER "]"
        alternate:  "[" prompt ("|" [prompt])+ "]"
        plain:      (any character but \\ [ ] ( ) : |, or \\ followed by a character)+

    A bracket that does not parse inside a prompt fails that prompt; at the top level it is kept as text. A
    prompt the grammar rejects (a `|` outside brackets) has no schedule: the web UI uses it as it is.
    Items are strings, Scheduled or Alternate.
    """

    def __init__(self, text: str):
        self.text, self.n = text, len(text)

    def parse(self) -> list | None:
        items, i = [], 0
        while i < self.n:
            prompt, i = self.prompt(i)
            items += prompt
            if i < self.n:
                if self.text[i] not in "[]():":
                    return None                    # a "|" or a trailing backslash: not this grammar
                items.append(self.text[i])         # a stray bracket or colon
                i += 1
        return items

    def prompt(self, i: int) -> tuple[list, int]:
        items = []
        while i < self.n:
            char = self.text[i]
            if char in "([":
                bracket = self.bracket(i)
                if bracket is None:
                    break
                item, i = bracket
                items += item
            elif char == "\\":
                if i + 1 >= self.n or self.text[i + 1] == "\n":
                    break
                items.append(self.text[i:i + 2])
                i += 2
            elif char in _STOPS:
                break
            else:
                j = i
                while j < self.n and self.text[j] not in _STOPS:
                    j += 1
                items.append(self.text[i:j])
                i = j
        return items, i

    def bracket(self, i: int) -> tuple[list, int] | None:
        first, j = self.prompt(i + 1)
        if j >= self.n:
            return None
        char = self.text[j]
        if self.text[i] == "(":
            if char == ")":
                return ["(", *first, ")"], j + 1
            if char == ":":
                second, k = self.prompt(j + 1)
                if k < self.n and self.text[k] == ")":
                    return ["(", *first, ":", *second, ")"], k + 1
            return None
        if char == "]":
            return ["[", *first, "]"], j + 1
        if char == ":":
            number = _NUMBER_CLOSE.match(self.text, j + 1)
            if number:                                                   # [to:when]
                return [Scheduled(None, first, number.group(1))], number.end()
            second, k = self.prompt(j + 1)
            number = _NUMBER_CLOSE.match(self.text, k + 1) if k < self.n and self.text[k] == ":" else None
            if number:                                                   # [from:to:when]
                return [Scheduled(first, second, number.group(1))], number.end()
            return None
        if char == "|":
            options = [first]
            while j < self.n and self.text[j] == "|":
                option, j = self.prompt(j + 1)
                options.append(option)
            if j < self.n and self.text[j] == "]":
                return [Alternate(options)], j + 1
        return None


def when_to_step(when: str, steps: int) -> int:
    """The step a `[…:when]` switches after: "0.25" (has a ".") → int(0.25·steps), "5" → 5; at most `steps`."""
    value = float(when) * steps if "." in when else float(when)
    return min(steps, int(value))


def _switch_steps(items: list, steps: int) -> set[int]:
    found = set()
    for item in items:
        if isinstance(item, Scheduled):
            step = when_to_step(item.when, steps)
            if step >= 1:
                found.add(step)
            found |= _switch_steps((item.before or []) + item.after, steps)
        elif isinstance(item, Alternate):
            found |= set(range(1, steps + 1))
            for option in item.options:
                found |= _switch_steps(option, steps)
    return found


def _text_at(items: list, step: int, steps: int) -> str:
    parts = []
    for item in items:
        if isinstance(item, Scheduled):
            chosen = (item.before or []) if step <= when_to_step(item.when, steps) else item.after
            parts.append(_text_at(chosen, step, steps))
        elif isinstance(item, Alternate):
            parts.append(_text_at(item.options[(step - 1) % len(item.options)], step, steps))
        else:
            parts.append(item)
    return "".join(parts)


def schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """The web UI's prompt schedule: [(end_at_step, text)], ascending, the last end = steps.

    `a [b:c:0.5] d` at 10 steps → [(5, "a b d"), (10, "a c d")]; `[a|b]` at 4 → [(1, a), (2, b), (3, a), (4, b)].
    The texts keep their emphasis brackets for `parse_weights`. Step i of the run (from 0) uses the entry
    `entry_at_step(ends, i)`. One known difference: the web UI's own doctest `a [{b|d{:.5] c` (marked "not
    handling this right now" there) schedules the "|" inside; we keep such a prompt whole, as text.
    """
    items = _ScheduleParser(prompt).parse()
    if items is None:
        return [(steps, prompt)]
    return [(end, _text_at(items, end, steps)) for end in sorted(_switch_steps(items, steps) | {steps})]


def entry_at_step(ends: list[int], step: int) -> int:
    """Index of the schedule entry the sampler's step `step` (0-based) uses: the first with step ≤ end."""
    for index, end in enumerate(ends):
        if step <= end:
            return index
    return 0                # past the end (the web UI's fallback): the first entry


# ---------------------------------------------------------------------------------------------------------------
# 3. Chunks: [(fragment, weight)] → token ids and weights, 77 per chunk
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Chunk:
    """One text-encoder input: ids [77] = BOS, ≤ 75 ids, EOS, padding; weights [77] (1.0 on BOS, EOS, padding)."""
    ids: list[int]
    weights: list[float]


def chunks(fragments: list[tuple[str, float]], tokenizer, backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """Weighted fragments → chunks, as the web UI's `tokenize_line` (see the module docstring for the rules).

    tokenizer: needs `.encode(text) -> ids`, `bos_id`, `eos_id`, `pad_id`. A prompt of n ids (no BREAK, no
    comma moves) gives ⌈n / 75⌉ chunks, at least one (the empty prompt is one chunk of padding).
    """
    comma = tokenizer.encode(",")
    comma = comma[0] if len(comma) == 1 else None
    done: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1                              # position of the last comma in the current chunk

    def close(ids: list[int], weights: list[float]) -> None:
        pad = CHUNK_LENGTH - len(ids)
        # BOS + ids + EOS + padding; SD v1 pads with EOS itself, SD v2 with 0 (the web UI's id_pad)
        done.append(Chunk([tokenizer.bos_id, *ids, tokenizer.eos_id] + [tokenizer.pad_id] * pad,
                          [1.0, *weights, 1.0] + [1.0] * pad))

    for text, weight in fragments:
        if text == "BREAK" and weight == BREAK_WEIGHT:
            close(ids, weights)
            ids, weights, last_comma = [], [], -1
            continue
        for group in _groups(tokenizer, text):
            if group == [comma]:
                last_comma = len(ids)
            elif backtrack and len(ids) == CHUNK_LENGTH and last_comma != -1 and \
                    len(ids) - last_comma <= backtrack:
                cut = last_comma + 1             # the tokens after the comma start the next chunk
                close(ids[:cut], weights[:cut])
                ids, weights, last_comma = ids[cut:], weights[cut:], -1
            if len(ids) + len(group) > CHUNK_LENGTH:   # full, or an embedding's n vectors would straddle two
                close(ids, weights)                    # chunks: the web UI moves the whole embedding on
                ids, weights, last_comma = [], [], -1
            ids += group
            weights += [weight] * len(group)
    if ids or not done:
        close(ids, weights)
    return done


def _groups(tokenizer, text: str) -> list[list[int]]:
    """The ids of one fragment in groups kept in one chunk: a textual-inversion embedding's n ids are one group
    (tokenizer.encode_words); a tokenizer without added tokens gives one id per group."""
    if hasattr(tokenizer, "encode_words"):
        return tokenizer.encode_words(text)
    return [[token] for token in tokenizer.encode(text)]


def prompt_chunks(text: str, tokenizer) -> list[Chunk]:
    """One schedule entry's text → its chunks: `chunks(parse_weights(text), tokenizer)`."""
    return chunks(parse_weights(text), tokenizer)
