"""Text out of document files: the visible text of HTML pages and the text layer of PDFs.

Two readers use these: corpus ingestion (`finesmith.domain.ingest`) and the sensitive-data
refusal before training (`finesmith.data.validate.refuse_sensitive`), which must scan
exactly the text a staged run would train on.
"""

from __future__ import annotations

import importlib.util
from html.parser import HTMLParser
from pathlib import Path

from finesmith.errors import FinesmithError

SKIPPED_HTML_TAGS = {"script", "style", "noscript", "template", "head"}
BLOCK_HTML_TAGS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article",
                   "pre", "blockquote", "table", "ul", "ol", "dd", "dt", "hr", "title"}


class _TextExtractor(HTMLParser):
    """Collects visible text; block elements become paragraph breaks."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in SKIPPED_HTML_TAGS:
            self._skip_depth += 1
        elif tag in BLOCK_HTML_TAGS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in SKIPPED_HTML_TAGS:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag in BLOCK_HTML_TAGS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self._skip_depth:
            self.parts.append(data)


def require(module: str, purpose: str) -> None:
    """Fail with an install hint when an optional dependency of the `domain` extra is missing."""
    if importlib.util.find_spec(module) is None:
        raise FinesmithError(f"{purpose} needs {module}; install it with `pip install 'finesmith[domain]'`")


def html_to_text(html: str) -> str:
    """Visible text of an HTML page (scripts, styles and the head are left out)."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return "".join(parser.parts)


def pdf_to_text(path: Path) -> str:
    """Text layer of a PDF, pages separated by blank lines.

    Raises:
        FinesmithError: the file is not a readable PDF.
    """
    require("pypdf", "reading .pdf files")
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except (PdfReadError, ValueError, KeyError) as exc:
        raise FinesmithError(f"{path}: not a readable PDF ({exc}); remove it from the corpus or re-export it") from None
