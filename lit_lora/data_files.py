"""Reading data files: JSON or JSONL records, their encoding, and public datasets fetched by URL with a checksum.
What comes out is a list of records for lit_lora/data.py to format, tokenize and split: instructions,
{instruction, input, output}, or conversations, {messages: [{role, content}, ...]}, read from OpenAI's layout
(`messages`: role system, user or assistant, and content) or ShareGPT's (`conversations`: from system, human or gpt,
and value).
"""

import codecs
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Union

from lit_lora.files import atomic_write, file_sha256, json_loads
from lit_lora.tokenizer import check_utf8


def load_records(path: Union[str, Path], instruction_key: str = "instruction", input_key: str = "input",
                 output_key: str = "output") -> list[dict]:
    """Records from a JSON list or a JSONL file (one object per line), as {instruction, input, output}.

    A missing or null input counts as empty (no input); a missing or null instruction or output, or a value
    that is not a string, is an error naming the record (and line) and the field.
    """
    path = Path(path)
    raw = read_records(path)
    records = []
    for where, record in raw:
        if not isinstance(record, dict):
            raise ValueError(f"{path}, {where}: expected an object with fields, found {type(record).__name__}")
        if "messages" in record or "conversations" in record:
            records.append({"messages": conversation(record, f"{path}, {where}")})
            continue
        out = {}
        for field, key in (("instruction", instruction_key), ("input", input_key), ("output", output_key)):
            if field == "input" and record.get(key) is None:  # missing, or null: both mean "no input"
                out[field] = ""
                continue
            if key not in record:
                raise ValueError(f"{path}, {where}: missing the field {key!r} ({field}); "
                                 f"its fields are {sorted(record)}. Name the right one with --{field}_key")
            value = record[key]
            if value is None:
                raise ValueError(f"{path}, {where}: field {key!r} ({field}) is null; it must be a string. "
                                 f"Give the record its {field}, or remove the record")
            if not isinstance(value, str):
                raise ValueError(f"{path}, {where}: field {key!r} must be a string, found {type(value).__name__}")
            check_utf8(value, f"{path}, {where}: field {key!r}")
            out[field] = value
        records.append(out)
    return records


def read_records(path: Path) -> list[tuple[str, object]]:
    """(where, record) for each record of a JSON or JSONL data file (parse_json_records); a missing file or one
    with no records is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"No data file at {path}")
    raw = parse_json_records(path, read_utf8(path))
    if not raw:
        raise ValueError(f"{path} holds no records: an empty dataset cannot be prepared")
    return raw


# The roles of a conversation's turns, as OpenAI's layout (role) and ShareGPT's (from) name them
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}


def conversation(record: dict, where: str) -> list[dict]:
    """The messages of a conversation record, {"role", "content"} each, with every turn checked: a known role and
    text that is not empty."""
    key, role_key, text_key = ("messages", "role", "content") if "messages" in record else ("conversations", "from",
                                                                                            "value")
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: {key} must be a list of turns, not {json.dumps(turns)[:60]}")
    messages = []
    for i, turn in enumerate(turns):
        role = turn.get(role_key) if isinstance(turn, dict) else None
        if not isinstance(role, str) or role not in ROLES:  # a list or a dict cannot even be looked up
            raise ValueError(f"{where}, turn {i}: the role {role!r} is not one of {', '.join(ROLES)} (the turn is "
                             f"{json.dumps(turn)[:80]})")
        text = turn.get(text_key)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}, turn {i} ({role}): {text_key} must be text, not {json.dumps(text)[:40]}: "
                             "give the turn its text, or remove the turn")
        check_utf8(text, f"{where}, turn {i} ({role}): {text_key}")
        messages.append({"role": ROLES[role], "content": text})
    return messages


# Byte-order marks that say a file is not UTF-8 (UTF-32's first: UTF-32-LE's begins with UTF-16-LE's).
OTHER_BYTE_ORDER_MARKS = {
    "UTF-32": (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE),
    "UTF-16": (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE),
}


def read_utf8(path: Path) -> str:
    """The text of a data file, which must be UTF-8 (JSON's encoding); a UTF-8 byte-order mark is dropped.

    Another encoding is refused, with where the first byte that is not UTF-8 is and the command that
    re-encodes the file: guessing the encoding could silently turn characters into others.
    """
    data = path.read_bytes()
    utf8_copy = path.with_name(f"{path.stem}.utf8{path.suffix}")
    for encoding, marks in OTHER_BYTE_ORDER_MARKS.items():
        if data.startswith(marks):
            raise ValueError(f"{path} is {encoding}, not UTF-8 (it starts with the {encoding} byte-order mark); data "
                             f"files must be UTF-8. Re-encode it: iconv -f {encoding} -t UTF-8 {path} > {utf8_copy}")
    if b"\x00" in data:  # valid UTF-8, but no JSON text holds a NUL byte: UTF-16 without its mark, or not text
        position = data.index(b"\x00")
        line = data.count(b"\n", 0, position) + 1
        raise ValueError(f"{path}, line {line} (byte {position}): a NUL byte, which no UTF-8 JSON file holds. "
                         "If the file is UTF-16 without a byte-order mark, re-encode it: "
                         f"iconv -f UTF-16LE -t UTF-8 {path} > {utf8_copy}")
    try:
        return data.decode("utf-8-sig")  # -sig: drop the byte-order mark some Windows editors put first
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}, line {line} (byte {e.start}): byte 0x{data[e.start]:02x} is not UTF-8; data "
                         "files must be UTF-8. If the file is Latin-1, re-encode it: "
                         f"iconv -f LATIN1 -t UTF-8 {path} > {utf8_copy} (Windows-1252: -f CP1252)") from None


def parse_json_records(path: Path, text: str) -> list[tuple[str, object]]:
    """(where, record) for each record of a JSON list, or of a JSONL file (one JSON object per line).

    The text tells which, not the file's name: a text starting with "{" whose first line is a whole JSON
    object is JSONL; any other text is one JSON document, which must be a list of records.
    """
    lines = text.splitlines()
    first_line = next((line for line in lines if line.strip()), "")
    if first_line.lstrip().startswith("{") and is_json(first_line):
        raw = []
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                raw.append((f"record {len(raw)} (line {line_number})", json_loads(line, f"{path}, line {line_number}")))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {line_number}: not valid JSON ({e.msg}, column {e.colno}). "
                                 "A JSONL file holds one JSON object per line.") from None
        # One line holding an object whose records sit in a list under one of its keys is one JSON object too
        if len(raw) == 1 and isinstance(raw[0][1], dict) and keys_holding_records(raw[0][1]):
            raise ValueError(one_object_message(path, raw[0][1], n_lines=1))
        return raw
    try:
        data = json_loads(text, path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict):  # e.g. a pretty-printed object spanning lines: not JSONL, and not a list
        raise ValueError(one_object_message(path, data, n_lines=len(lines)))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, found a {type(data).__name__}")
    return [(f"record {i}", record) for i, record in enumerate(data)]


def is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except (ValueError, RecursionError):  # not JSON, or nested too deeply to tell
        return False


def keys_holding_records(data: dict) -> list[str]:
    """The keys of `data` whose value is a list of objects: where a file wrapped in an object keeps its records
    (a conversation's turns are not records: a record of `messages` or `conversations` is one conversation)."""
    return [key for key, value in data.items() if key not in ("messages", "conversations")
            and isinstance(value, list) and value and all(isinstance(item, dict) for item in value)]


def one_object_message(path: Path, data: dict, n_lines: int) -> str:
    spanning = f" spanning {n_lines} lines" if n_lines > 1 else ""
    message = (f"{path} holds one JSON object{spanning}, not records: expected a JSON list of records "
               "([{...}, {...}]) or a JSONL file with one record per line.")
    keys = keys_holding_records(data)
    if keys:
        lists = ", ".join(f"{key!r} ({len(data[key])} objects)" for key in keys)
        message += (f" The object has a list of objects under {lists}: if those are the records, save that list "
                    f"alone as the data file, e.g. jq '.[{json.dumps(keys[0])}]' {path} > records.json")
    return message


def check_sha256(path: Path, expected: Optional[str], allow_mismatch: bool = False, given: bool = False) -> str:
    """The sha256 of a public dataset's file (downloaded, or `given` with --data_file), checked against the one
    recorded for it; returned, to be recorded in prepare_config.json.

    The pinned URL fixes which file is asked for; the checksum tells that the file at hand is that one, not a
    damaged or edited copy or another release, which would silently give other examples and other results.
    `expected` None means that no checksum is known yet: the file's is printed, not checked.
    """
    found = file_sha256(path)
    if expected is None:
        print(f"sha256 of {path}: {found} (no known checksum to check it against; recorded in prepare_config.json)")
    elif found != expected:
        mismatch = f"{path} is not the expected file: sha256 expected {expected}, found {found}"
        if not allow_mismatch:
            if given:  # the user's own copy: maybe on purpose
                todo = ("if it is your own version (cleaned, say), prepare it with --allow_checksum_mismatch true; to "
                        "prepare the published release instead, leave --data_file out and it is downloaded")
            else:
                todo = f"the download is damaged or the release changed: delete {path} and run again to download it again"
            raise ValueError(f"{mismatch}. {todo[0].upper() + todo[1:]}")
        print(f"Warning: {mismatch}; preparing it anyway (--allow_checksum_mismatch true)")
    return found


def download(url: str, path: Path) -> Path:
    """Fetch `url` to `path` (once: an existing file is reused).

    The bytes go to a temporary file beside `path`, renamed to `path` when complete (atomic_write): a failed or
    interrupted download (offline, Ctrl-C) leaves no partial file that a later run would take for the data.
    """
    if path.is_file():
        return path
    print(f"Downloading {url} to {path}")

    def fetch(tmp: str) -> None:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as file:
            shutil.copyfileobj(response, file)

    try:
        atomic_write(path, fetch)
    except OSError as e:  # no network, a wrong address, a server error, a timeout, a full disk
        reason = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise ConnectionError(f"Could not download {url} ({reason}). Download it on a machine with internet "
                              "access and pass it with --data_file") from None
    return path
