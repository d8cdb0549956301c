import pytest

from kvshift.data.clean import ParagraphDedup, html_to_text, looks_generated, normalise, rst_to_text

SPHINX_PAGE = """<!DOCTYPE html><html><head><title>T</title><style>body{color:red}</style>
<script>var nav = "SCRIPT";</script></head><body>
<div class="related" role="navigation"><ul><li><a href="x">index</a></li><li>modules |</li></ul></div>
<div class="sphinxsidebar"><p>SIDEBAR</p></div>
<div class="body" role="main">
<h1>Heading<a class="headerlink" href="#h">¶</a></h1>
<p>First &amp; <em>para</em>
   spread   over lines.</p>
<div class="note"><p>Nested div text.</p></div>
<ul><li>one<li>two</ul>
<pre>def f(x):
    return x  # kept verbatim</pre>
</div>
<div class="footer">FOOTER TEXT</div>
</body></html>"""


def test_html_main_only_drops_navigation_script_and_markup():
    text = html_to_text(SPHINX_PAGE, main_only=True)
    assert "# Heading" in text
    assert "First & para spread over lines." in text
    assert "Nested div text." in text
    assert "- one" in text and "- two" in text
    assert "def f(x):\n    return x  # kept verbatim" in text
    for junk in ("SCRIPT", "SIDEBAR", "index", "FOOTER", "¶", "<", "color:red"):
        assert junk not in text, junk


def test_html_without_main_uses_whole_body():
    text = html_to_text("<html><body><nav>NAV</nav><p>Hello <b>world</b></p><p>Bye</p></body></html>", main_only=True)
    assert text == "Hello world\n\nBye"


RST = """.. SPDX-License-Identifier: GPL-2.0

.. _label:

=========
The Title
=========

Some :c:func:`kmalloc` text with ``literal``, a `link <https://x.org>`_ and a ref_.

.. toctree::
   :maxdepth: 2

   hidden/page

.. note::

   A kept note.

==== =====
col  value
==== =====

Example::

    code line
"""


def test_rst_to_text_removes_markup_keeps_words():
    text = rst_to_text(RST)
    assert text.startswith("The Title")
    assert "Some kmalloc text with literal, a link and a ref." in text
    assert "A kept note." in text
    assert "Example:\n" in text and "    code line" in text
    for junk in ("SPDX", ".. ", "toctree", "hidden/page", ":maxdepth:", "=====", ":c:func:", "``", "https://"):
        assert junk not in text, junk


def test_normalise_prose_and_code():
    raw = "a\u00a0 b\t\tc  \r\n\r\n\r\n\r\nd\x00e\x07\n"
    assert normalise(raw) == "a b c\n\nde"
    # prose keeps literal-block indentation (docs examples) but collapses runs after it
    assert normalise("Example:\n\n    {\n        \"a\":   1\n    }  \n") == 'Example:\n\n    {\n        "a": 1\n    }'
    assert "    return x # kept verbatim" in normalise(html_to_text(SPHINX_PAGE, main_only=True)).split("\n")
    code = "def f():\n\tif x:   \n\t\treturn 1\n\n\n\n"
    assert normalise(code, code=True) == "def f():\n    if x:\n        return 1"


def test_paragraph_dedup_drops_long_repeats_only():
    long_para = "x" * 150
    d = ParagraphDedup(min_chars=100)
    assert d(f"intro one\n\n{long_para}\n\nExit.") == f"intro one\n\n{long_para}\n\nExit."
    assert d(f"intro two\n\n{long_para}\n\nExit.") == "intro two\n\nExit."
    assert d.dropped == 1


def test_looks_generated():
    assert looks_generated("x = [" + "1, " * 2000 + "]")
    assert not looks_generated("def f():\n    return 1\n")


@pytest.mark.parametrize("bad", ["<p>unclosed <b>tags", "<div><p>a</div></p>b"], ids=["unclosed", "misnested"])
def test_html_tolerates_broken_markup(bad):
    assert "a" in html_to_text(bad) or "unclosed" in html_to_text(bad)
