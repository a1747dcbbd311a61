"""AUTOMATIC1111 prompt syntax (prompts.py), the weighted, chunked context (conditioning.py) and prompt embeddings
in and out of the pipeline (pipeline.py), on the bundled tiny model and CLIP's real vocabulary.

Expected parses and schedules are the web UI's own (the doctests of its modules/prompt_parser.py, and the two
examples of issue 15); the chunk rules are those of its sd_hijack_clip.py."""
import pytest
import torch

import ldm_scratch
from ldm_scratch.conditioning import emphasize
from ldm_scratch.prompts import (CHUNK_LENGTH, chunks, entry_at_step, parse_weights, prompt_chunks, schedule,
                                 when_to_step)

FAST = dict(steps=2, progress=False, output_type="latent", height=32, width=32)
pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors: extra threads only contend (conftest.py)


@pytest.fixture(scope="module")
def pipe():
    return ldm_scratch.load_pipeline()


@pytest.fixture(scope="module")
def tok(pipe):
    return pipe.tokenizer


def plain_context(pipe, texts, clip_skip=None):
    """Today's (pre-issue-15) context: the tokenizer's one 77-token row per prompt through CLIP."""
    with torch.inference_mode():
        return pipe.text_encoder(pipe.tokenizer(texts), clip_skip=clip_skip)


# ---------------------------------------------------------------------------------------------------------------
# Parsing weights
# ---------------------------------------------------------------------------------------------------------------

PARSES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),          # issue 15's second example
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",          # issue 15's first example
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("((a))", [("a", 1.2100000000000002)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("(a: 1.3 ) b", [("a", 1.3), (" b", 1.0)]),
    ("(a:-0.5)", [("a", -0.5)]),
    ("a) b] c:d", [("a) b] c:d", 1.0)]),                             # nothing to close: literal
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a BREAKING b", [("a BREAKING b", 1.0)]),                       # BREAK only as a whole word
    ("a break b", [("a break b", 1.0)]),                             # and only upper case
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),      # the web UI's quirk: a weighted BREAK is text
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("text, expected", PARSES)
def test_parse_weights_matches_the_web_ui(text, expected):
    got = parse_weights(text)
    assert [fragment for fragment, _ in got] == [fragment for fragment, _ in expected]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in expected], rel=1e-12)
    if text.startswith("a (((house") or text == "((a))":
        assert got == expected                                        # the same products, bit for bit


def test_a_weight_that_is_not_a_number_is_explained():
    with pytest.raises(ValueError, match=r"'1\.2\.3' in the prompt .* is not a weight"):
        parse_weights("(a:1.2.3)")


# ---------------------------------------------------------------------------------------------------------------
# Editing and alternation
# ---------------------------------------------------------------------------------------------------------------

SCHEDULES_10 = [   # the web UI's doctests, at 10 steps
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(k, "a" if k % 2 else "(b:1.1)") for k in range(1, 11)]),
    ("[fe|]male", [(k, "female" if k % 2 else "male") for k in range(1, 11)]),
    ("[fe|||]male", [(k, "female" if k % 4 == 1 else "male") for k in range(1, 11)]),
    ("a [red:blue:0.5] b", [(5, "a red b"), (10, "a blue b")]),
    ("[from::4] x", [(4, "from x"), (10, " x")]),
    ("[a:b:1.0]", [(10, "a")]),                  # "1.0" has a ".": the whole run (10 steps), so never b
    ("[a:b:1]", [(1, "a"), (10, "b")]),          # "1" is step 1
    ("[a:b:0]", [(10, "b")]),
    ("[a:b:25]", [(10, "a")]),                   # past the end: clipped to the last step
    ("a | b", [(10, "a | b")]),                  # the grammar rejects it: the text as it is
    ("(x:[a:b:2])", [(2, "(x:a)"), (10, "(x:b)")]),
]


@pytest.mark.parametrize("prompt, expected", SCHEDULES_10)
def test_schedule_matches_the_web_ui(prompt, expected):
    assert schedule(prompt, 10) == expected


@pytest.mark.parametrize("when, steps, step", [("0.5", 30, 15), ("10", 30, 10), (".25", 10, 2), ("0.99", 10, 9),
                                               ("3.", 10, 10), ("1e1", 30, 10)])
def test_when_a_dot_means_a_fraction_else_a_step(when, steps, step):
    assert when_to_step(when, steps) == step


def test_entry_at_step_uses_the_first_entry_not_yet_ended():
    ends = [10, 20]                              # [a:b:10] of 20 steps: steps 0…10 use a, 11…19 use b
    assert [entry_at_step(ends, i) for i in (0, 10, 11, 19)] == [0, 0, 1, 1]


# ---------------------------------------------------------------------------------------------------------------
# Chunks
# ---------------------------------------------------------------------------------------------------------------

def test_a_short_prompt_is_one_chunk_equal_to_the_tokenizers_row(tok):
    (chunk,) = prompt_chunks("a red circle on a blue background", tok)
    assert chunk.ids == tok(["a red circle on a blue background"])[0].tolist()
    assert chunk.weights == [1.0] * 77
    (empty,) = prompt_chunks("", tok)
    assert empty.ids == tok([""])[0].tolist()


def test_weights_fall_on_their_tokens_and_never_on_specials(tok):
    (chunk,) = prompt_chunks("a (red:1.5) [circle]", tok)
    n = len(tok.encode("a red circle"))
    assert chunk.weights[:n + 2] == [1.0, 1.0, 1.5, 1 / 1.1, 1.0]     # BOS, a, red, circle, EOS
    assert chunk.weights[n + 2:] == [1.0] * (77 - n - 2)             # padding


@pytest.mark.parametrize("n_ids, n_chunks", [(75, 1), (76, 2), (150, 2), (151, 3)])
def test_long_prompts_fill_chunks_of_75(tok, n_ids, n_chunks):
    word = tok.encode("cat")
    assert len(word) == 1
    got = prompt_chunks(" ".join(["cat"] * n_ids), tok)
    assert len(got) == n_chunks
    for chunk in got:
        assert len(chunk.ids) == 77 and chunk.ids[0] == tok.bos_id
    assert [i for chunk in got for i in chunk.ids[1:76] if i != tok.eos_id] == word * n_ids
    assert got[-1].ids[1 + n_ids - CHUNK_LENGTH * (n_chunks - 1)] == tok.eos_id


@pytest.mark.parametrize("comma_at, moved", [(55, True), (54, False), (74, True)])
def test_comma_back_off_within_the_last_20_tokens(tok, comma_at, moved):
    """A full chunk with a comma at position p (0-based among its 75 ids) moves what follows the comma to the next
    chunk when 75 − p ≤ 20, as the web UI's comma_padding_backtrack = 20."""
    text = " ".join(["cat"] * comma_at) + " , " + " ".join(["dog"] * 40)
    first, second = prompt_chunks(text, tok)
    comma = tok.encode(",")[0]
    ids = first.ids[1:76]
    if moved:
        assert ids[comma_at] == comma and all(i == tok.eos_id for i in ids[comma_at + 1:])  # cut after the comma
        assert second.ids[1:1 + 75 - comma_at - 1] == tok.encode("dog") * (75 - comma_at - 1)
    else:
        assert ids[comma_at] == comma and tok.eos_id not in ids                           # full chunk
    assert sum(i == tok.encode("dog")[0] for c in (first, second) for i in c.ids) == 40     # nothing lost


def test_break_starts_a_new_chunk(tok):
    got = prompt_chunks("a red circle BREAK blue", tok)
    assert [c.ids[:5] for c in got] == [tok(["a red circle"])[0][:5].tolist(), tok(["blue"])[0][:5].tolist()]
    assert len(prompt_chunks("BREAK", tok)) == 1 and len(prompt_chunks("a BREAK BREAK b", tok)) == 3


def test_padding_uses_the_tokenizers_pad_id(tok):
    """SD v2's OpenCLIP tokenizer pads with 0, not EOS: BOS, ids, EOS, then pad_id."""
    class PadZero:
        bos_id, eos_id, pad_id = tok.bos_id, tok.eos_id, 0
        encode = staticmethod(tok.encode)
    (chunk,) = chunks(parse_weights("a red circle"), PadZero())
    assert chunk.ids[:5] == [tok.bos_id, *tok.encode("a red circle"), tok.eos_id] and set(chunk.ids[5:]) == {0}


# ---------------------------------------------------------------------------------------------------------------
# Contexts
# ---------------------------------------------------------------------------------------------------------------

def test_plain_prompts_give_exactly_todays_context(pipe):
    prompts = ["a red circle on a blue background", "a green square"]
    context, negative = pipe.encode_prompt(prompts)
    assert torch.equal(context, plain_context(pipe, prompts))           # bit for bit: diffusers parity unchanged
    assert torch.equal(negative, plain_context(pipe, ["", ""]))
    context, _ = pipe.encode_prompt("a red circle", clip_skip=1)
    assert torch.equal(context, plain_context(pipe, ["a red circle"], clip_skip=1))


def test_the_weighted_context_is_the_original_emphasis_formula(pipe, tok):
    context, _ = pipe.encode_prompt("a (red:1.5) [circle]")
    z = plain_context(pipe, ["a red circle"])[0]                       # [77, D]: the same ids, unweighted
    w = torch.ones(77)
    w[2], w[3] = 1.5, 1 / 1.1                                            # BOS, a, red, circle
    zw = z * w[:, None]
    expected = zw * (z.mean() / zw.mean())                               # z' = z·w · mean(z) / mean(z·w)
    # measured: max |difference| 0 (the same float32 operations); 1e-6 leaves room for another reduction order
    torch.testing.assert_close(context[0], expected, atol=1e-6, rtol=0)
    assert not torch.allclose(context[0], z, atol=1e-3)                  # the weights changed it
    assert context[0].mean().item() == pytest.approx(z.mean().item(), rel=1e-5)   # mean preserved


def test_emphasize_leaves_unweighted_chunks_untouched():
    z = torch.randn(3, 77, 8)
    w = torch.ones(3, 77)
    w[1, 5] = 2.0
    out = emphasize(z, w)
    assert torch.equal(out[0], z[0]) and torch.equal(out[2], z[2]) and not torch.equal(out[1], z[1])


def test_a_long_prompt_gives_one_77_token_context_per_chunk(pipe, tok):
    text = " ".join(["cat"] * 100) + " BREAK " + " ".join(["dog"] * 10)          # 75 + 25 | 10: three chunks
    context, negative = pipe.encode_prompt(text)
    assert context.shape == (1, 3 * 77, pipe.config.text_encoder.width)
    ids = torch.tensor([chunk.ids for chunk in prompt_chunks(text, tok)])
    with torch.inference_mode():
        expected = pipe.text_encoder(ids).reshape(1, 3 * 77, -1)
    torch.testing.assert_close(context, expected, atol=1e-6, rtol=0)   # measured: 0 (same batch, same ops)
    # the negative prompt "" (1 chunk) is padded to 3 chunks with the empty prompt's chunk
    assert negative.shape == context.shape
    empty = plain_context(pipe, [""])[0]
    for k in range(3):
        torch.testing.assert_close(negative[0, 77 * k:77 * (k + 1)], empty, atol=1e-6, rtol=0)


def test_plain_syntax_reads_the_brackets_literally(pipe):
    context, _ = pipe.encode_prompt("a (red:1.5) circle", prompt_syntax="plain")
    assert torch.equal(context, plain_context(pipe, ["a (red:1.5) circle"]))
    assert not torch.allclose(context, pipe.encode_prompt("a (red:1.5) circle")[0])


def test_encode_prompt_gives_step_zero_of_an_edited_prompt(pipe):
    context, _ = pipe.encode_prompt("a [red:blue:0.5] circle")
    torch.testing.assert_close(context, pipe.encode_prompt("a red circle")[0], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# The pipeline: mismatched chunk counts, the per-step schedule, prompt embeddings
# ---------------------------------------------------------------------------------------------------------------

class ContextRecorder:
    """Wraps the UNet: records the context of every call."""

    def __init__(self, unet):
        self.unet, self.contexts = unet, []

    def __call__(self, x, t, context):
        self.contexts.append(context.clone())
        return self.unet(x, t, context)

    def parameters(self):
        return self.unet.parameters()


@pytest.mark.parametrize("sampler, prompt, expected", [
    ("euler", "[red:blue:1] circle", ["red", "red", "blue", "blue"]),          # steps 0, 1 ≤ 1 use red
    ("euler", "[red:blue:0.5] circle", ["red", "red", "red", "blue"]),         # 0.5 · 4 = step 2
    ("euler", "[red|blue] circle", ["red", "red", "blue", "red"]),             # the web UI's alternation
    ("heun", "[red:blue:1] circle", ["red"] * 4 + ["blue"] * 3),               # 2 calls a step (1 in the last)
])
def test_the_context_changes_at_the_right_step(pipe, monkeypatch, sampler, prompt, expected):
    recorder = ContextRecorder(pipe.unet)
    monkeypatch.setattr(pipe, "unet", recorder)
    pipe.txt2img(prompt, guidance_scale=1.0, sampler=sampler, seed=0, **{**FAST, "steps": 4})
    words = {word: pipe.encode_prompt(f"{word} circle")[0] for word in ("red", "blue")}
    got = [next(w for w, c in words.items() if torch.equal(context, c)) for context in recorder.contexts]
    assert got == expected


def test_mismatched_chunk_counts_under_cfg_and_in_a_batch(pipe, monkeypatch):
    """A 2-chunk prompt beside a 1-chunk prompt and a 1-chunk negative: every context is padded to 2 chunks with
    the empty prompt's chunk, and the UNet still gets one batch [uncond; cond] (conditioning.py)."""
    recorder = ContextRecorder(pipe.unet)
    monkeypatch.setattr(pipe, "unet", recorder)
    long = " ".join(["cat"] * 90)                                           # 2 chunks
    out = pipe.txt2img([long, "a red circle"], negative_prompt="blurry", seed=0, **FAST)
    assert torch.isfinite(out).all()
    context = recorder.contexts[0]                                          # [uncond ×2; cond ×2]
    assert context.shape == (4, 2 * 77, pipe.config.text_encoder.width)
    empty = plain_context(pipe, [""])[0]
    # measured: max |difference| 0 for each (the same CLIP rows); 1e-6 allows another batch composition
    torch.testing.assert_close(context[2], pipe.encode_prompt(long)[0][0], atol=1e-6, rtol=0)
    for row, text in ((0, "blurry"), (1, "blurry"), (3, "a red circle")):
        torch.testing.assert_close(context[row, :77], plain_context(pipe, [text])[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(context[row, 77:], empty, atol=1e-6, rtol=0)
    # a negative prompt longer than the prompt: the prompt is the one padded
    context, negative = pipe.encode_prompt("a red circle", negative_prompt=long)
    assert context.shape == negative.shape == (1, 2 * 77, pipe.config.text_encoder.width)
    torch.testing.assert_close(context[0, 77:], empty, atol=1e-6, rtol=0)


def test_img2img_counts_the_schedule_from_its_first_step(pipe, monkeypatch):
    """As the web UI: strength 0.5 of 4 steps runs 2 steps, counted 0 and 1, so [red:blue:1] never reaches blue."""
    recorder = ContextRecorder(pipe.unet)
    monkeypatch.setattr(pipe, "unet", recorder)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pipe.img2img("[red:blue:1] circle", image, strength=0.5, guidance_scale=1.0, sampler="euler", seed=0,
                 **{**FAST, "steps": 4})
    red = pipe.encode_prompt("red circle")[0]
    assert len(recorder.contexts) == 2 and all(torch.equal(c, red) for c in recorder.contexts)


def test_prompt_embeds_round_trip(pipe):
    context, negative = pipe.encode_prompt("a (red:1.3) circle", negative_prompt="blurry")
    from_text = pipe.txt2img("a (red:1.3) circle", negative_prompt="blurry", seed=0, **FAST)
    from_embeds = pipe.txt2img(prompt_embeds=context, negative_prompt_embeds=negative, seed=0, **FAST)
    assert torch.equal(from_text, from_embeds)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    for call, args in ((pipe.img2img, (image,)), (pipe.inpaint, (image, mask))):
        a = call("a (red:1.3) circle", *args, negative_prompt="blurry", seed=0, **FAST)
        b = call(None, *args, prompt_embeds=context, negative_prompt_embeds=negative, seed=0, **FAST)
        assert torch.equal(a, b)
    # an edited context is used as given; the negative side may be text
    edited = pipe.txt2img(prompt_embeds=context * 2, negative_prompt="blurry", seed=0, **FAST)
    assert not torch.equal(edited, from_text)


def test_prompt_embeds_of_different_lengths_are_padded(pipe):
    long, _ = pipe.encode_prompt(" ".join(["cat"] * 90))                  # [1, 154, D]
    short, _ = pipe.encode_prompt("")                                       # [1, 77, D]
    out = pipe.txt2img(prompt_embeds=long, negative_prompt_embeds=short, seed=0, **FAST)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(prompt="a", prompt_embeds=torch.zeros(1, 77, 32)), ValueError, "either prompt or prompt_embeds"),
    (dict(prompt=None), TypeError, "prompt must be a string"),
    (dict(prompt_embeds=torch.zeros(1, 77, 16)), ValueError, "width D = 16 but .* gives 32"),
    (dict(prompt_embeds=torch.zeros(1, 70, 32)), ValueError, r"shape \[P, 77·k, D\]"),
    (dict(prompt_embeds=torch.zeros(77, 32)), ValueError, r"shape \[P, 77·k, D\]"),
    (dict(prompt_embeds=[[0.0]]), TypeError, "must be a float tensor"),
    (dict(prompt_embeds=torch.full((1, 77, 32), float("nan"))), ValueError, "NaN or inf"),
    (dict(prompt_embeds=torch.zeros(2, 77, 32), negative_prompt_embeds=torch.zeros(1, 77, 32)), ValueError,
     "holds 1 prompts but there are 2"),
    (dict(prompt="a", negative_prompt="b", negative_prompt_embeds=torch.zeros(1, 77, 32)), ValueError,
     "either negative_prompt or negative_prompt_embeds"),
    (dict(prompt="a", prompt_syntax="webui"), ValueError, "prompt_syntax must be one of"),
    (dict(prompt="a", prompt_syntax=None), ValueError, "prompt_syntax must be one of"),
])
def test_bad_prompt_arguments_are_explained(pipe, kwargs, error, message):
    with pytest.raises(error, match=message):
        pipe.txt2img(seed=0, **{**FAST, **kwargs})


def test_encode_prompt_checks_its_arguments(pipe):
    with pytest.raises(ValueError, match="prompt_syntax must be one of"):
        pipe.encode_prompt("a", prompt_syntax="A1111")
    with pytest.raises(TypeError, match="prompt must be a string"):
        pipe.encode_prompt(3)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def test_cli_prompt_syntax_option(tmp_path, monkeypatch):
    from ldm_scratch import cli
    assert cli.build_parser().parse_args(["generate", "x"]).prompt_syntax == "a1111"
    assert cli.build_parser().parse_args(["generate", "x", "--prompt-syntax", "plain"]).prompt_syntax == "plain"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generate", "x", "--prompt-syntax", "webui"])
    seen = {}
    real_txt2img = ldm_scratch.pipeline.StableDiffusion.txt2img

    def spy(self, prompt=None, **kwargs):
        seen.update(kwargs)
        return real_txt2img(self, prompt, **kwargs)
    monkeypatch.setattr(ldm_scratch.pipeline.StableDiffusion, "txt2img", spy)
    status = cli.main(["generate", "a (red:1.3) circle", "--prompt-syntax", "plain", "--steps", "2", "--seed", "0",
                       "--height", "32", "--width", "32", "--out", str(tmp_path / "x.png")])
    assert status == 0 and seen["prompt_syntax"] == "plain" and (tmp_path / "x.png").is_file()
