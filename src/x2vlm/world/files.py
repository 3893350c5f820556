"""Deterministic writers: same content, same bytes (UTF-8, '\\n' line ends, fixed key order)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

#: REFER's ``refs(unc).p`` files are protocol-2 pickles; protocol 2 is also byte-stable.
PICKLE_PROTOCOL = 2


def json_text(data, indent: int | None = None) -> str:
    return json.dumps(data, ensure_ascii=False, indent=indent) + "\n"


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)


def write_json(path: Path, data, indent: int | None = None) -> None:
    write_text(path, json_text(data, indent))


def write_json_lines(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def write_pickle(path: Path, data) -> None:
    write_bytes(path, pickle.dumps(data, protocol=PICKLE_PROTOCOL))
