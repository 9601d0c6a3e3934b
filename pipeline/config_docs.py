"""The configuration reference, read from imgindex.yaml's own comments.

The docs' configuration page is made from this at every build, so a key
added to the YAML is documented there with its comment, and none can be
listed that the YAML lacks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from imgindex.pipeline.config import DEFAULTS_FILE

# Keys whose value is a mapping handed on as it is (Dask's own settings).
MAPPINGS = frozenset({"local.dask-config"})

_LINE = re.compile(
    r"^(?P<indent> *)(?P<key>[\w.-]+):(?P<value>[^#]*?)\s*(#\s?(?P<note>.*))?$"
)


@dataclass(frozen=True)
class KeyDoc:
    """One ``imgindex.*`` key: its default as the YAML writes it, and what it does."""

    key: str  # without the "imgindex." prefix, e.g. "index.recall-target"
    default: str
    meaning: str
    section: str  # the comment heading the YAML groups it under


def documented_keys(path: Path = DEFAULTS_FILE) -> list[KeyDoc]:
    """Every key of the YAML at ``path``, in its order, with its comment.

    A mapping of :data:`MAPPINGS` is one key: its meaning is the comment
    above it, its default the settings it holds.
    """
    keys: list[KeyDoc] = []
    parents: list[tuple[int, str]] = []  # (indent, name) of enclosing sections
    section = ""
    comments: list[str] = []  # the comment block just above a line
    # (indent, key, meaning, section) of a mapping being read
    mapping: tuple[int, str, str, str] | None = None
    held: list[str] = []
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped:
            comments = []
            continue
        if stripped.startswith("#"):
            comments.append(stripped.lstrip("#").strip())
            if len(raw) - len(raw.lstrip()) == 2 and len(comments) == 1:
                section = re.split(r"[:(]", comments[0].rstrip("."))[0].strip()
            continue
        m = _LINE.match(raw)
        if m is None:
            continue
        indent = len(m["indent"])
        if mapping is not None:
            if indent > mapping[0]:
                held.append(f"{m['key']}: {m['value'].strip()}")
                continue
            keys.append(KeyDoc(mapping[1], ", ".join(held), *mapping[2:]))
            mapping, held = None, []
        while parents and parents[-1][0] >= indent:
            parents.pop()
        dotted = ".".join([name for _, name in parents[1:]] + [m["key"]])
        value = m["value"].strip()
        if not value:  # a section, or a mapping kept whole
            if dotted in MAPPINGS:
                mapping = (indent, dotted, " ".join(comments), section)
            else:
                parents.append((indent, m["key"]))
                if indent == 2 and not comments:  # `serve:  # imgindex serve`
                    section = (m["note"] or m["key"].capitalize()).strip().strip("`")
            comments = []
            continue
        if not parents:
            continue
        keys.append(KeyDoc(dotted, value, (m["note"] or "").strip(), section))
        comments = []
    if mapping is not None:
        keys.append(KeyDoc(mapping[1], ", ".join(held), *mapping[2:]))
    return keys


def markdown_table(keys: list[KeyDoc]) -> str:
    """The keys as one Markdown table per section."""
    out: list[str] = []
    section = None
    for k in keys:
        if k.section != section:
            section = k.section
            out += [
                "",
                f"**{section}**",
                "",
                "| key | default | meaning |",
                "| --- | --- | --- |",
            ]
        out.append(f"| `{k.key}` | `{_cell(k.default)}` | {_cell(k.meaning)} |")
    return "\n".join(out).lstrip() + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")
