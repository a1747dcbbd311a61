"""Build the tokenizer test corpus and its golden ids from OpenAI's reference CLIP tokenizer.

    python scripts/make_tokenizer_golden.py            # writes tests/data/tokenizer_golden.json

The reference is `clip/simple_tokenizer.py` from the clip-anytorch 2.6.0 wheel (OpenAI's CLIP code, MIT),
downloaded with pip and loaded by file path, so the `clip` package is never imported or installed. It needs
`ftfy` and `regex` (the [reference] extra). Each prompt is encoded as CLIP does it (ftfy.fix_text on), and those
are the ids ldm_scratch must give, for every prompt. Each prompt is also encoded with ftfy.fix_text replaced by
the identity, only to mark the prompts where ftfy matters ("ftfy": true), so the tests can check that the corpus
keeps exercising the cleaning (curly quotes, mojibake, fullwidth forms, NFD accents, ligatures, ...).

The corpus is deterministic (hand-written prompts + prompts drawn from a seeded random.Random), so re-running
the script gives the same file; tests/test_tokenizer.py checks that the corpus and the file agree.
"""
from __future__ import annotations

import importlib.util
import json
import random
import sys
import tempfile
import types
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "tokenizer_golden.json"
SEED = 0

# --- hand-written prompts, one theme per list -------------------------------------------------------------------
SD_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A watercolor painting of a fox in a snowy forest, trending on artstation",
    "(masterpiece:1.2), (best quality:1.3), 1girl, solo, long hair, looking at viewer, smile",
    "((ultra detailed)), [[blurry]], {sharp focus}, (((cinematic lighting)))",
    "portrait of a cyberpunk samurai, neon lights, 8k, octane render, unreal engine 5, hyperrealistic",
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst quality",
    "a [cat|dog] sitting on a (red:0.8) couch, studio ghibli style",
    "landscape, mountains, lake, sunset, golden hour, f/1.8, 35mm, bokeh, ISO 100, 1/250s",
    "oil painting by Greg Rutkowski and Alphonse Mucha, art nouveau, intricate, elegant",
    "a cute corgi wearing sunglasses --ar 16:9 --v 5 --q 2",
    "photo of a red apple on a wooden table, macro, 4K UHD, HDR",
    "anime key visual of a girl with pink hair, by makoto shinkai, highly detailed, digital art",
    "isometric 3D render of a tiny cozy room, pastel colors, blender, low poly",
    "Portrait of Abraham Lincoln, daguerreotype, 1865",
    "embedding:EasyNegative, <lora:add_detail:0.7>, <hypernet:anime:1>",
    "a city skyline at night; reflections in the river — long exposure",
    "steampunk airship over Victorian London, matte painting, 19th century",
    "pixel art, 16-bit, SNES style, a knight fighting a dragon",
    "A BEAUTIFUL SUNSET OVER THE OCEAN, WAVES, SEAGULLS",
    "detailed face, (freckles:0.6), green eyes, natural skin texture, RAW photo, dslr, film grain, Fujifilm XT3",
    "negative: (worst quality, low quality:1.4), monochrome, zombie, (interlocked fingers:1.2)",
    "a bowl of ramen, food photography, steam rising, chopsticks",
    "the Mona Lisa as a Lego figure",
    "an astronaut's helmet reflecting Earth, NASA photo",
    "Van Gogh's Starry Night but in Minecraft",
    "AND a dragon AND a castle BREAK snow, winter",
    "masterpiece, best quality, highres, absurdres, 1boy, male focus, armor, sword, (dynamic pose:1.1)",
    "top-down view of a medieval village map, D&D, fantasy, parchment",
    "cat, cat, cat, cat, cat",
    "A robot painting a self-portrait, surrealism, Salvador Dalí",
]

ACCENTS = [
    "café crème brûlée à la française", "Ça va? Où est la bibliothèque?", "jalapeño piñata mañana",
    "Straße, Größe, Übermut, Ärger, Öl", "São Paulo, coração, ação", "Crème de la crème",
    "Tiếng Việt có nhiều dấu: ạ ả ã ầ ẩ ẫ ậ", "Łódź, Kraków, Gdańsk, źdźbło", "Příliš žluťoučký kůň úpěl ďábelské ódy",
    "İstanbul, ılık, Iğdır, ŞİŞLİ", "Þórður og Ðóra í Reykjavík", "smörgåsbord, fjäll, Ålesund, Æbleskiver, Øl",
    "naïve coöperation, Zoë, Noël", "ǅemal, ǈubljana, ǋegoš (titlecase digraphs)", "résumé vs. resume",
    "Ελληνικά: καλημέρα, ΣΊΣΥΦΟΣ, ΐ, ς", "façade, déjà vu, piñata, über",
]

SCRIPTS = [
    "一只在雪地里的狐狸，水彩画", "東京タワーの夜景、美しい", "ｶﾀｶﾅ ﾊﾝｶｸ", "한국어 프롬프트: 아름다운 풍경",
    "Красивый пейзаж с горами и озером", "ЁЖИК В ТУМАНЕ", "Українська мова: ґанок, їжак, єнот",
    "منظر طبيعي جميل مع غروب الشمس", "اَلسَّلَامُ عَلَيْكُمْ", "العدد ٣٤٥ والرقم ٧",
    "שלום עולם, תמונה של חתול", "हिन्दी में एक सुंदर चित्र", "ภาษาไทย ภาพวาดสวยงาม", "தமிழ் ஓவியம்",
    "বাংলা ৩ ৪ ৫", "ქართული ენა", "Հայերեն", "ᚠᚢᚦᚨᚱᚲ runes", "ትግርኛ ኣማርኛ", "ꦗꦮ", "漢字かなカナ混じり文ですね",
    "中文，标点。符号！“引号”《书名》", "日本語：「かぎ括弧」と『二重』", "Монгол хэл ᠮᠣᠩᠭᠣᠯ",
]

EMOJI = [
    "🦊 fox emoji", "🐱🐶🐭🐹", "👩‍🔬 scientist (ZWJ sequence)", "👍🏽 thumbs up, medium skin tone", "🇫🇷🇯🇵 flags",
    "1️⃣ keycap", "❤️ love ❤", "🏳️‍🌈 rainbow flag", "✨ sparkles ✨ magic ✨", "a cat😺in a hat🎩",
    "🔥🔥🔥 LIT 🔥🔥🔥", "☀️☁️☂️☃️", "𝕳𝖊𝖑𝖑𝖔 𝓌𝑜𝓇𝓁𝒹", "🀄🃏🎴", "👨‍👩‍👧‍👦 family",
]

DIGITS = [
    "1234567890", "3.14159265358979", "1,000,000 dollars", "½ ¼ ¾ ⅓", "x² + y³ = z⁴", "Ⅻ Ⅳ ⅻ", "① ② ⑳",
    "٠١٢٣٤٥٦٧٨٩", "०१२३", "𝟘𝟙𝟚", "2024-01-31T12:00:00Z", "v1.5, sd-v1-4, 512x512", "0.000001e-10",
    "+44 (0)20 7946 0958", "#ff8800 rgb(255, 136, 0)", "100% 50‰ 3°C", "¹²³ ₁₂₃",
]

PUNCTUATION = [
    "!!!???", "...", "…", "— – -", "@#$%^&*()_+", "<<<>>>", "::::", "''", '""', "` ~ ^", "\\/\\/", "[[[]]]",
    "a,b,c;d:e", "hello!!! world???", "(((((((((())))))))))", "¿Qué? ¡Sí!", "«guillemets» ‹single›",
    "„German“ quotes", "©®™ §¶ †‡", "•·●○◆", "→←↑↓⇒", "±×÷≠≤≥∞", "€£¥₹₿", "!?!?!?!?!?!?!?!?!?!?!?!?",
    "__init__", "a_b-c.d/e\\f", "http://example.com/path?q=1&r=2#frag", "user@example.com", "C++ and C#",
    "<|startoftext|>", "<|endoftext|>", "a<|endoftext|>b", "<|STARTOFTEXT|> upper", "<|startoftext", "<|end of text|>",
]

CONTRACTIONS = [
    "don't", "I'm", "we'll", "they're", "I've", "he'd", "it's", "DON'T STOP", "You'RE", "rock'n'roll",
    "o'clock", "y'all", "'''s", "'s", "'S'T'RE'VE'M'LL'D", "the dogs' bones", "l'été", "isn't it's",
    "shouldn't've", "'tis 'twas", "'ſ 'ſt", "'re-'ve-'ll", "Peter's and James's", "'", "''s",
]

WHITESPACE = [
    "tab\tseparated\tprompt", "new\nline\nprompt", "windows\r\nline\r\nends", "  leading and trailing  ",
    "non\u00a0breaking\u00a0space", "em\u2003space\u2002en", "ideographic\u3000space", "many      spaces",
    "\t\n mixed \r\n\t whitespace \x0b\x0c", "line\u2028separator\u2029para", "next\u0085line",
    "group\x1dsep\x1erecord\x1funit\x1cfile", "\x1c leading file separator", "zero\u200bwidth\u200cjoin\u200dx",
    "soft\u00adhyphen", "word\u2060joiner", "thin\u2009space", "ogham\u1680space",
]

HTML = [
    "Tom &amp; Jerry", "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp; double escaped", "&#39;quoted&#39;",
    "&quot;hello&quot;", "caf&eacute; na&iuml;ve", "&#x1F600; smiley", "&copy 2024", "AT&T", "&am incomplete",
    "&nbsp;nbsp&nbsp;", "1 &lt; 2 &amp;&amp; 3 &gt; 2", "&hearts;&spades;", "&amp;lt;double&amp;gt;",
    "<b>real tags</b> <i>stay</i>", "&#0; null entity", "&#x110000; out of range", "&frac12; cup",
]

CASE = [
    "HELLO World", "ÉCOLE NORMALE", "İSTANBUL", "ǅ ǈ ǋ Ǳ", "ẞ CAPITAL SHARP S", "ΣΟΦΊΑ", "MiXeD CaSe PrOmPt",
    "ⓐⓑⓒ ⒶⒷⒸ", "Ⅰ Ⅱ Ⅲ ⅰ ⅱ ⅲ", "ǰ ŉ", "K Kelvin Å Angstrom", "ΐΰ", "ﬃ ligature (upper: FFI)",
]

ODD = [
    "", " ", "\t", "\n\n", "a", "A", "1", "!", "é", "ー", "\u0345 ypogegrammeni a\u0345b",
    "combining e\u0301 acute", "a\u0300\u0301\u0302\u0303 stacked marks", "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇ zalgo",
    "\ufeffbyte order mark", "\x00null\x01ctrl\x7fdel", "\x1b[31mred\x1b[0m", "\ud7ff\ue000\uf8ff private",
    "\U0001F9EA test tube", "\u00b5 micro vs \u03bc mu", "\u2126 ohm vs \u03a9 omega", "\u0130 dotted I",
]

FTFY_REPAIRED = [  # text ftfy.fix_text rewrites: mojibake, fullwidth, ligatures, curly quotes, decomposed accents
    "cafÃ© crÃ¨me", "The Mona Lisa doesnâ€™t have eyebrows", "ï»¿BOM mojibake", "Ã©lÃ¨ve",
    "ＡＢＣ　ｆｕｌｌｗｉｄｔｈ　１２３", "ﬁne ﬂower ﬀ ﬃ ﬄ", "don’t “quote” ‘single’", "e\u0301cole de\u0301ja\u0300",
    "한\u1100\u1161 decomposed hangul", "&amp;amp;amp; triple escaped", "Ｈｅｌｌｏ！", "ﾃﾞｼﾞﾀﾙ",
    "it’s a dog’s life", "\x80\x93 C1 controls", "â€œsmart quotesâ€\x9d",
]

WEB_PASTED = [  # prompts as they arrive when pasted from web pages, forums, chat apps and prompt-sharing sites
    # curly quotes and apostrophes, primes, guillemets
    "a portrait of a woman who’s smiling, “cinematic lighting”, ‘soft focus’",
    "Don’t add text, don’t add watermarks — it’s a clean shot",
    "the artist‘s studio, ‚low-9 quote‘, „German style“",
    "a 6′2″ tall knight, 45° angle, ‹single guillemets› and «double»",
    "it’s the dragon’s lair, they’re hiding, we’ll see, I’ve been, she’d go, I’m here",
    # non-breaking and other Unicode spaces, zero-width characters
    "masterpiece,\u00a0best quality,\u00a0ultra detailed",
    "a\u202fnarrow\u202fno-break\u202fspace and a\u2007figure\u2007space",
    "hair\u200aspace, punctuation\u2008space, six-per-em\u2006space, four\u2005per\u2005em",
    "medium\u205fmathematical space and ideographic\u3000space",
    "zero\u200bwidth\u200bspace between every\u200bword",
    "a red\u200c rose, zero width non-joiner, \ufeffBOM in the middle",
    "word\u2060joiner and\u180emongolian vowel separator",
    "trailing nbsp and tabs\u00a0\u00a0\t\t",
    # accents written decomposed (NFD, as macOS file names and some editors produce them)
    "Pok\u00e9mon vs Poke\u0301mon, cafe\u0301 au lait",
    "Ame\u0301lie in Montre\u0301al, cre\u0300me bru\u0302le\u0301e",
    "Sa\u0303o Paulo at night, Mu\u0308nchen in winter, Zu\u0308rich lake",
    "Nguye\u0302\u0303n, tie\u0302\u0301ng Vie\u0323\u0302t",
    # fullwidth and halfwidth forms (East Asian input methods)
    "ＭＡＳＴＥＲＰＩＥＣＥ，ＢＥＳＴ　ＱＵＡＬＩＴＹ，（ｃｈｉｂｉ：１．２）",
    "１ｇｉｒｌ、ｓｏｌｏ、ｌｏｎｇ　ｈａｉｒ",
    "ｶﾜｲｲ ﾈｺ, halfwidth katakana, ﾞ and ﾟ marks",
    "（杰作：1.2），最高质量，１个女孩",
    # mojibake: UTF-8 read as Windows-1252 or Latin-1, once or twice
    "donâ€™t stop, itâ€™s a dogâ€™s life",
    "â€œquotedâ€\x9d and â€˜singleâ€™ and an em dash â€” here",
    "crÃ¨me brÃ»lÃ©e, naÃ¯ve, Ãœber, SÃ£o Paulo",
    "Ã¢â‚¬â„¢ double-encoded apostrophe",
    "BjÃ¶rk in ReykjavÃ­k, GrÃ¼nerlÃ¸kka",
    "ï¼ˆmasterpieceï¼‰ mojibake of fullwidth",
    # HTML entities, numeric references, double escaping (copied out of page sources and RSS feeds)
    "Tom &amp; Jerry&#8217;s house &mdash; a cartoon",
    "&ldquo;a cat&rdquo; &lsquo;sitting&rsquo; on a mat&hellip;",
    "&amp;quot;double escaped quotes&amp;quot; &amp;amp;amp;",
    "caf&#233; &#x263A; &#128512; &#x1F431; numeric refs",
    "&lt;lora:detail_tweaker:0.5&gt;, &lt;hypernet:anime:1&gt;",
    "a&nbsp;photo&nbsp;of&nbsp;a&nbsp;dog, &thinsp;thin &ensp;en &emsp;em",
    "&copy; &reg; &trade; &deg;C &plusmn; &frac34; &times; &divide;",
    "&notanentity; &amp &lt3 &#xZZ; broken entities",
    # emoji with ZWJ sequences, skin tones, variation selectors, flags, keycaps
    "👩🏽‍🎨 an artist painting, 🧑🏿‍🚀 astronaut, 👨‍👩‍👧 family",
    "🫶🏻 heart hands, 👋🏼 wave, 🤌🏾 pinched fingers, 🧔🏽‍♂️ beard",
    "🏴󠁧󠁢󠁳󠁣󠁴󠁿 Scotland flag with tag characters, 🇺🇦🇯🇵🇧🇷 flags",
    "❤️‍🔥 heart on fire, ❤\ufe0e text style, ☺\ufe0f emoji style",
    "#️⃣ *️⃣ 0️⃣ keycaps and 🐈‍⬛ black cat",
    # CJK, RTL text with direction marks, mixed scripts
    "傑作, 最高品質, 1人の女の子, 桜の木の下で, 夕焼け",
    "수채화 스타일, 고양이, 벚꽃, 4k",
    "一个穿着汉服的女孩，站在长城上，电影感光线",
    "\u202bמשפט בעברית\u202c with embedding marks, \u200fRLM and \u200eLRM",
    "لوحة زيتية لقطة\u200f، بأسلوب فان جوخ",
    "\u2067isolate\u2069 \u2066LTR isolate\u2069 \u202eoverride\u202c",
    # ligatures, soft hyphens, smart dashes and ellipses
    "ﬁreﬂies in the ﬁeld, ﬀ ligature, Ĳssel, ǆ digraph",
    "extra\u00adordinary soft\u00adhyphen\u00adated words",
    "red–blue gradient — dramatic ‒ figure dash ― horizontal bar ‐ hyphen ‑ non-breaking",
    "and then… nothing… just ‥ two dots",
    "minus − sign, 10 × 20, ≈ 3, ≠ 4, ⁄ fraction slash",
    # AUTOMATIC1111-style weighted prompts as they are shared online
    "(masterpiece:1.2), (best quality:1.1), ((detailed eyes)), [[simple background]], (red hair:0.8)",
    "a (((cat))) on a [dog:cat:0.5] in the (garden:1.3) BREAK (sunset:1.2), [bokeh|lens flare]",
    "(worst quality, low quality:1.4), (monochrome:1.1), EasyNegative, bad_prompt_version2",
    "\\(escaped parentheses\\), \\[escaped brackets\\], a \\\\ backslash",
    "<lora:more_details:0.6>, <lyco:style:1.0>, (1girl:1.1), solo, [from:to:10]",
    "(“curly quoted phrase”:1.3), (don’t:0.5), (（full width）:1.2)",
    "((masterpiece)),((best quality)),8k,highres,absurdres,(extremely detailed CG unity 8k wallpaper:1.1)",
    "score_9, score_8_up, score_7_up, source_anime, rating_safe, (cowboy shot:1.2)",
    # very long prompts as shared on prompt sites (well past 75 tokens)
    "(masterpiece, best quality:1.2), ultra-detailed, 8k, photorealistic, raw photo, a beautiful woman standing "
    "in a sunflower field at golden hour, wind in her hair, wearing a white sundress, soft rim lighting, shallow "
    "depth of field, 85mm lens, f/1.4, bokeh, film grain, kodak portra 400, cinematic color grading, volumetric "
    "light, god rays, lens flare, highly detailed skin texture, pores, freckles, natural makeup, looking at viewer, "
    "gentle smile, (detailed eyes:1.2), (detailed hands:1.1), trending on artstation, award winning photography",
    "Negative prompt: (worst quality:2), (low quality:2), (normal quality:2), lowres, normal quality, "
    "((monochrome)), ((grayscale)), skin spots, acnes, skin blemishes, age spot, (ugly:1.331), (duplicate:1.331), "
    "(morbid:1.21), (mutilated:1.21), (tranny:1.331), mutated hands, (poorly drawn hands:1.5), blurry, "
    "(bad anatomy:1.21), (bad proportions:1.331), extra limbs, (disfigured:1.331), (missing arms:1.331), "
    "(extra legs:1.331), (fused fingers:1.61051), (too many fingers:1.61051), (unclear eyes:1.331), lowers, "
    "bad hands, missing fingers, extra digit, bad hands, missing fingers, (((extra arms and legs)))",
    "“A cozy café interior” — warm light… rain on the windows, people’s silhouettes, ＬＯＦＩ aesthetic, "
    "cafÃ© mojibake, &amp; HTML, \u00a0nbsp, e\u0301 decomposed, 👩🏽‍🍳 barista, 東京の雨, ﬁne details, "
    "extra\u00adordinary, – dashes —, (steam:1.2), [[blurry]], and a very long tail of tags: " + ", ".join(
        ["coffee", "books", "plants", "neon sign", "wooden table", "latte art", "bokeh", "city lights"] * 4),
]

# --- words for random prompts: every kind of text above, mixed the way real prompts mix them -------------------
WORDS = [
    "a", "the", "photo", "of", "cat", "dog", "fox", "portrait", "landscape", "highly", "detailed", "masterpiece",
    "best", "quality", "8k", "4K", "UHD", "(masterpiece:1.2)", "(best quality:1.4)", "[blurry]", "{sharp}",
    "((detailed))", "1girl", "solo", "by", "Greg", "Rutkowski", "trending", "artstation", "octane", "render",
    "café", "naïve", "Straße", "İstanbul", "Ελληνικά", "Москва", "кот", "東京", "狐狸", "猫", "한국", "مرحبا",
    "שלום", "हिन्दी", "ไทย", "🦊", "🐱", "👩‍🔬", "🇫🇷", "❤️", "✨", "🔥", "123", "3.14", "2024", "½", "Ⅻ", "٣",
    "!!!", "...", "—", "?!", ",", ";", ":", "(", ")", "[", "]", "{", "}", "<", ">", "|", "/", "\\", "#", "@",
    "don't", "I'm", "we'll", "it's", "they're", "I've", "he'd", "O'Neil", "&amp;", "&lt;", "&gt;", "&quot;",
    "&#39;", "HELLO", "WoRlD", "ÉCOLE", "ΣΟΦΙΑ", "<|endoftext|>", "\u0345", "a_b", "x-y", "f/1.8", "--ar", "16:9",
    "lighthouse", "sunset", "cyberpunk", "neon",
]
FTFY_WORDS = ["’", "“", "”", "ﬁ", "Ｆｕｌｌ", "e\u0301", "&eacute;", "cafÃ©"]   # text ftfy.fix_text would rewrite
SEPARATORS = [" ", " ", " ", ", ", ", ", "", "  ", "\t", "\n", " | ", ". ", "\u3000", "\u00a0", " BREAK "]


def random_prompts(rng: random.Random, n: int, min_words: int, max_words: int, words: list[str] = WORDS) -> list[str]:
    prompts = []
    for _ in range(n):
        k = rng.randint(min_words, max_words)
        parts = [rng.choice(words) + rng.choice(SEPARATORS) for _ in range(k)]
        text = "".join(parts)
        if rng.random() < 0.3:
            text = text.upper()
        elif rng.random() < 0.2:
            text = text.title()
        prompts.append(text)
    return prompts


def long_prompts(rng: random.Random) -> list[str]:
    """Prompts past CLIP's 75-id budget: real-looking ones and a few built to end just around the cut."""
    base = SD_PROMPTS[2] + ", " + SD_PROMPTS[4] + ", " + SD_PROMPTS[5]
    out = [base, base + ", " + SD_PROMPTS[8], " ".join(["lighthouse"] * 80), "!" * 400, "🦊" * 60,
           "1" * 90, " ".join(["a"] * 74), " ".join(["a"] * 75), " ".join(["a"] * 76), " ".join(["a"] * 77),
           "東京" * 50, "Москва " * 40]
    out += [", ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120))) for _ in range(8)]
    return out


def build_corpus(seed: int = SEED) -> list[str]:
    """The test corpus: hand-written prompts of every kind, then seeded random mixtures; ≥ 500, deterministic."""
    rng = random.Random(seed)
    hand = (SD_PROMPTS + ACCENTS + SCRIPTS + EMOJI + DIGITS + PUNCTUATION + CONTRACTIONS + WHITESPACE + HTML + CASE
            + ODD + FTFY_REPAIRED + WEB_PASTED)
    corpus = (hand + long_prompts(rng) + random_prompts(rng, 330, 1, 12) + random_prompts(rng, 40, 20, 40)
              + random_prompts(rng, 30, 1, 12, WORDS + FTFY_WORDS))
    corpus = list(dict.fromkeys(corpus))      # drop repeats, keep order
    assert len(corpus) >= 500, len(corpus)
    return corpus


# --- the reference tokenizer -------------------------------------------------------------------------------------

def load_reference(workdir: str | Path, use_ftfy: bool = True):
    """OpenAI's SimpleTokenizer from the clip-anytorch wheel, loaded by file path (the clip package is not imported).

    use_ftfy=False replaces ftfy.fix_text by the identity in that module copy: everything else stays CLIP's.
    """
    from ldm_scratch.tokenizer import OPENAI_VOCAB_FILE, download_clip_wheel
    workdir = Path(workdir)
    source = workdir / "clip" / "simple_tokenizer.py"
    if not source.is_file():
        wheel = download_clip_wheel(workdir)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract("clip/simple_tokenizer.py", workdir)
            zf.extract(f"clip/{OPENAI_VOCAB_FILE}", workdir)
    name = f"_openai_simple_tokenizer_{'ftfy' if use_ftfy else 'noftfy'}"
    spec = importlib.util.spec_from_file_location(name, source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)           # imports ftfy and regex
    if not use_ftfy:
        module.ftfy = types.SimpleNamespace(fix_text=lambda text: text)
    return module.SimpleTokenizer(bpe_path=str(workdir / "clip" / OPENAI_VOCAB_FILE))


def main() -> None:
    sys.path.insert(0, str(ROOT))
    import ftfy
    import regex
    import unicodedata

    from ldm_scratch.tokenizer import load_tokenizer

    corpus = build_corpus()
    with tempfile.TemporaryDirectory() as tmp:
        ref, ref_plain = load_reference(tmp), load_reference(tmp, use_ftfy=False)
        entries = []
        for text in corpus:
            ids = ref.encode(text)
            entries.append({"text": text, "ids": ids, "ftfy": ids != ref_plain.encode(text)})

    ours = load_tokenizer()
    mismatches = [e["text"] for e in entries if ours.encode(e["text"]) != e["ids"]]
    header = {
        "about": "Prompts and OpenAI CLIP token ids (no BOS/EOS, no truncation), made by "
                 "scripts/make_tokenizer_golden.py with ftfy on, as CLIP runs it; ftfy=true: ftfy.fix_text changes "
                 "the ids of that prompt (the reference without it would give others).",
        "reference": f"clip-anytorch 2.6.0 clip/simple_tokenizer.py; ftfy {ftfy.__version__}, regex "
                     f"{regex.__version__}, Python {sys.version.split()[0]} (Unicode {unicodedata.unidata_version})",
        "seed": SEED,
        "n_prompts": len(entries),
        "n_ftfy": sum(e["ftfy"] for e in entries),
    }
    # One prompt per line: a readable, diff-friendly file.
    lines = [json.dumps(e, ensure_ascii=False) for e in entries]
    body = json.dumps(header, ensure_ascii=False, indent=1)[:-2] + ',\n "prompts": [\n' + ",\n".join(lines) + "\n]}\n"
    json.loads(body)                          # it must still be valid JSON
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(body, encoding="utf-8")
    print(f"wrote {GOLDEN.relative_to(ROOT)}: {len(entries)} prompts, {header['n_ftfy']} changed by ftfy")
    for e in entries:
        if e["ftfy"]:
            print(f"  ftfy: {e['text']!r} -> {ftfy.fix_text(e['text'])!r}")
    print(f"ldm_scratch disagrees with the reference on {len(mismatches)} prompts: {mismatches[:5]}")


if __name__ == "__main__":
    main()
