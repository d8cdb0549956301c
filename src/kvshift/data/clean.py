"""Text cleaning: HTML and reStructuredText to plain text, whitespace normalisation, paragraph de-duplication.

Everything here is stdlib-only and deterministic; the corpus builder applies `normalise` to every
document and `ParagraphDedup` to prose domains (code is de-duplicated per whole file instead, since
dropping a repeated block from a source file would break it).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from html.parser import HTMLParser

__all__ = ["html_to_text", "rst_to_text", "normalise", "ParagraphDedup", "looks_generated"]

# ---------------------------------------------------------------------------------------------
# whitespace

_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u3000]+")
_BLANKS = re.compile(r"\n{3,}")


def normalise(text: str, *, code: bool = False) -> str:
    """NFC, unix newlines, no control characters, no trailing spaces, at most one blank line in a row.

    Prose also has runs of spaces/tabs collapsed to one space; code keeps its indentation (tabs
    become 4 spaces so the tokenizer sees one indentation alphabet).
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CTRL.sub("", text)
    if code:
        lines = [ln.replace("\t", "    ").rstrip() for ln in text.split("\n")]
    else:  # keep indentation (literal blocks, verse), collapse runs of spaces after it
        lines = []
        for ln in text.split("\n"):
            body = ln.lstrip(" \t")
            lead = ln[: len(ln) - len(body)].replace("\t", "    ")
            body = _SPACES.sub(" ", body).rstrip()
            lines.append(lead + body if body else "")
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip("\n")


# ---------------------------------------------------------------------------------------------
# HTML

_BLOCK = {
    "p", "div", "section", "article", "br", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table",
    "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "hr", "figure", "figcaption",
}
_SKIP = {"script", "style", "head", "nav", "footer", "header", "noscript", "template", "svg", "form", "button"}


_VOID = {"br", "hr", "img", "meta", "link", "input", "wbr", "area", "base", "col", "source"}


class _TextExtractor(HTMLParser):
    """Collects visible text; `main_only` keeps only the subtree of the first role="main" element.

    Skipped and main subtrees are tracked by counting nested tags of the same name, which stays
    correct with HTML's unclosed <p>/<li> elements.
    """

    def __init__(self, main_only: bool):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip: tuple[str, int] | None = None  # (tag, nesting) of the subtree being skipped
        self.main: tuple[str, int] | None = None  # (tag, nesting) of the main element while inside it
        self.main_only = main_only
        self.seen_main = False
        self.pre_depth = 0

    def _active(self) -> bool:
        return self.skip is None and (not self.main_only or self.main is not None)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.main is not None and tag == self.main[0]:
            self.main = (tag, self.main[1] + 1)
        if self.skip is not None:
            if tag == self.skip[0]:
                self.skip = (tag, self.skip[1] + 1)
            return
        if self.main_only and not self.seen_main and a.get("role") == "main":
            self.main, self.seen_main = (tag, 1), True
            return
        cls = (a.get("class") or "").split()
        if tag in _SKIP or "headerlink" in cls or "sphinxsidebar" in cls or "related" in cls:
            if tag not in _VOID:
                self.skip = (tag, 1)
            return
        if tag == "pre":
            self.pre_depth += 1
        if tag in _BLOCK and self._active():
            self.parts.append("\n" if tag in ("br", "li", "dt", "tr") else "\n\n")
            if tag == "li":
                self.parts.append("- ")
            elif tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
                self.parts.append("#" * int(tag[1]) + " ")

    def handle_endtag(self, tag):
        if self.skip is not None:
            if tag == self.skip[0]:
                self.skip = None if self.skip[1] == 1 else (tag, self.skip[1] - 1)
            return
        if tag == "pre":
            self.pre_depth = max(0, self.pre_depth - 1)
        if tag in _BLOCK and self._active():
            self.parts.append("\n\n")
        if self.main is not None and tag == self.main[0]:
            self.main = None if self.main[1] == 1 else (tag, self.main[1] - 1)

    def handle_data(self, data):
        if not self._active():
            return
        if self.pre_depth == 0:
            data = re.sub(r"\s+", " ", data)
            if not self.parts or self.parts[-1].endswith("\n") or self.parts[-1].endswith("- "):
                data = data.lstrip()  # no stray indentation from markup line breaks
        if data:
            self.parts.append(data)


def html_to_text(markup: str, *, main_only: bool = False) -> str:
    """Visible text of an HTML page, block elements as paragraphs, `<pre>` kept verbatim.

    `main_only` keeps only the element marked role="main" (Sphinx pages), dropping navigation.
    If the page has no such element the whole body is used.
    """
    p = _TextExtractor(main_only)
    p.feed(markup)
    p.close()
    if main_only and not p.seen_main:
        return html_to_text(markup, main_only=False)
    text = "".join(p.parts)
    text = "\n".join(ln.rstrip() for ln in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip()


# ---------------------------------------------------------------------------------------------
# reStructuredText

_RST_ADORN = re.compile(r"^([=\-~^\"'`#*+_:.])\1{2,}\s*$")
_RST_TABLE_RULE = re.compile(r"^\s*[+|]?[=\-+| ]*[=\-]{3,}[=\-+| ]*$")  # simple/grid table borders
_RST_ROLE = re.compile(r":[a-zA-Z][\w:+.-]*:`(?:[^`<]*?<([^`>]+)>|([^`]+))`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`__?")
_RST_REF = re.compile(r"`([^`]+)`_{1,2}")
_RST_BARE_REF = re.compile(r"(?<![\w`])([A-Za-z0-9]+)__?(?=[\s.,;:)]|$)")
_RST_LITERAL = re.compile(r"``([^`]+)``")
_RST_DIRECTIVE = re.compile(r"^\s*\.\.\s+([\w:-]+)::(.*)$")
_RST_COMMENT = re.compile(r"^\.\.(\s|$)")
_RST_SUBST = re.compile(r"\|([\w -]+)\|")
_RST_OPTION = re.compile(r"^\s+:[\w -]+:")
# directives whose body is kept as text; others (toctree, image, kernel-doc, ...) are dropped with their body
_RST_KEEP = {"note", "warning", "tip", "important", "attention", "caution", "hint", "seealso",
             "code-block", "code", "sourcecode", "highlight", "literalinclude", "admonition", "versionadded",
             "versionchanged", "deprecated", "c:function", "c:type", "c:macro", "c:struct", "function",
             "class", "method", "attribute", "data", "describe", "option", "envvar"}


def rst_to_text(src: str) -> str:
    """Readable text from reStructuredText: titles keep their words, adornment lines, comments,
    `..` directive markers of non-text directives, option fields and role markup are removed."""
    out: list[str] = []
    drop_indent: int | None = None  # inside a dropped directive body: skip lines indented more than this
    for line in src.split("\n"):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if drop_indent is not None:
            if not stripped or indent > drop_indent:
                continue
            drop_indent = None
        if _RST_ADORN.match(line) or _RST_TABLE_RULE.match(line):
            continue
        m = _RST_DIRECTIVE.match(line)
        if m:
            name, arg = m.group(1), m.group(2).strip()
            if name.lower() in _RST_KEEP:
                if arg and name.lower() not in ("code-block", "code", "sourcecode", "highlight", "literalinclude"):
                    out.append(" " * indent + arg)
            else:
                drop_indent = indent
            continue
        if _RST_COMMENT.match(stripped):
            if stripped.startswith(".. _") or stripped == ".." or stripped.startswith(".. |"):
                drop_indent = indent if stripped == ".." else None
                continue
            drop_indent = indent  # a comment block
            continue
        if _RST_OPTION.match(line) and out and _RST_DIRECTIVE.match(out[-1] or ""):
            continue
        line = _RST_ROLE.sub(lambda m: m.group(1) or m.group(2), line)
        line = _RST_LINK.sub(r"\1", line)
        line = _RST_LITERAL.sub(r"\1", line)
        line = _RST_REF.sub(r"\1", line)
        line = _RST_BARE_REF.sub(r"\1", line)
        line = _RST_SUBST.sub(r"\1", line)
        if line.rstrip().endswith("::"):  # "text::" introduces a literal block: keep one colon
            line = line.rstrip()[:-1] if line.rstrip() != "::" else ""
        out.append(line)
    return _BLANKS.sub("\n\n", "\n".join(out)).strip()


# ---------------------------------------------------------------------------------------------
# heuristics and de-duplication


def looks_generated(text: str, *, max_line: int = 1000, max_mean_line: float = 120.0) -> bool:
    """True for minified / data-table style files: one very long line, or long lines on average."""
    lines = text.split("\n")
    if not lines:
        return True
    longest = max(len(ln) for ln in lines)
    mean = sum(len(ln) for ln in lines) / len(lines)
    return longest > max_line or mean > max_mean_line


class ParagraphDedup:
    """Drops exact repeats of paragraphs (blank-line separated) seen earlier in the whole corpus.

    Only paragraphs of at least `min_chars` characters are de-duplicated: short repeats ("Exit.",
    a verse refrain, a speaker name) are real text, long exact repeats are boilerplate.
    """

    def __init__(self, min_chars: int = 100):
        self.min_chars = min_chars
        self.seen: set[bytes] = set()
        self.dropped = 0

    def __call__(self, text: str) -> str:
        kept = []
        for para in text.split("\n\n"):
            if len(para) >= self.min_chars:
                h = hashlib.blake2b(para.encode("utf-8"), digest_size=12).digest()
                if h in self.seen:
                    self.dropped += 1
                    continue
                self.seen.add(h)
            kept.append(para)
        return "\n\n".join(kept)
