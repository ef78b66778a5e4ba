"""What the outputs a user shares may say about the data and the machine.

Working files keep what they need: ``config.yaml``, ``split.csv`` and ``predictions_*.csv`` hold
absolute paths and patient IDs in clear, by design (resume, evaluation and the user's own lookups
read them). The outputs that travel - ``report.html``, ``metrics.json``, ``model/``, ``gallery.json``
and its images, ``logs/`` - hold neither, unless the run was trained with ``--keep-identifiers``:

- an image is named by its path relative to the data folder, with its patient ID replaced by
  :func:`~medtransfer.data.patients.salted_patient_id` (``pid-`` + 16 hex digits, the salt of
  :func:`~medtransfer.data.patients.local_salt` in the cache folder: stable on this machine, not
  reversible without the salt) wherever the ID appears in it;
- a patient is named by the same hash;
- settings lose ``cache_dir`` (the home folder, hence the user name) and keep only the last part of
  ``data``, ``split_file`` and any other absolute path;
- a folder the output names (the data a model was evaluated on, the run it came from, an ensemble's
  members) is named by :func:`folder_name` (its last part) or :func:`relative_location` (relative to the
  output's own folder: ``members/seed-3``, ``../runs/demo``), which :func:`locate` reads back;
  :func:`without_folders` makes free text (error messages, descriptions) follow the same rule.

:class:`Identities` holds one data set's clear identifiers (from ``split.csv``, or a predictions
file) and rewrites text; :func:`deidentify_metrics` applies it to metrics.json's content.

    >>> ids = Identities([("/home/ana/xr/test/P/person7_virus_1.png", "person7_virus")], salt=b"s" * 32)
    >>> ids.image("/home/ana/xr/test/P/person7_virus_1.png")  # doctest: +SKIP
    'test/P/pid-3a1f0c9e5d2b7a46_1.png'
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import Any

from medtransfer.data.patients import local_salt, salted_patient_id
from medtransfer.rundir import RunDir

__all__ = [
    "DROPPED_SETTINGS", "Identities", "deidentify_metrics", "folder_name", "locate", "relative_location", "run_identities",
    "shareable_settings", "visible_settings", "without_folders",
]

DROPPED_SETTINGS = ("cache_dir",)  # a local folder, usually under the home folder: says who and where, not how


def shareable_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings without ``cache_dir``, and with every absolute path (``data``, ``split_file``, ``weights``...)
    cut to its last part (``/home/ana/data/chest_xray`` -> ``chest_xray``); other values as they are."""
    out = {}
    for key, value in settings.items():
        if key in DROPPED_SETTINGS:
            continue
        if isinstance(value, str) and _is_path(value):  # a relative path says nothing about the machine
            value = PurePath(value).name or value
        out[key] = value
    return out


def visible_settings(settings: Mapping[str, Any] | None, keep_identifiers: bool | None = None) -> dict[str, Any] | None:
    """Settings as a shareable page shows them: as they are where `keep_identifiers` (None: the settings' own
    ``keep_identifiers``) is true, else :func:`shareable_settings`."""
    if settings is None:
        return None
    keep = bool(settings.get("keep_identifiers")) if keep_identifiers is None else keep_identifiers
    return dict(settings) if keep else shareable_settings(settings)


def folder_name(path: str | os.PathLike[str]) -> str:
    """A folder (or file) by its last part, as shareable outputs name the data: ``/home/ana/xr/chest_xray`` ->
    ``chest_xray``; ``.`` -> the current folder's name."""
    return PurePath(path).name or Path(os.path.abspath(path)).name or str(path)


def relative_location(target: str | os.PathLike[str], base: str | os.PathLike[str]) -> str:
    """`target` as a path relative to the folder `base` (``members/seed-3``, ``../runs/demo``), where both lie in
    one folder that is neither the file system's root nor above the home folder (so the path names no user); else
    :func:`folder_name` of `target`. :func:`locate` reads it back."""
    there, here = Path(target).resolve(), Path(base).resolve()
    try:
        common = Path(os.path.commonpath([there, here]))
    except ValueError:  # other drives
        return folder_name(there)
    home = Path.home().resolve()
    if len(common.parts) <= 1 or (home.is_relative_to(common) and home != common):
        return folder_name(there)
    return Path(os.path.relpath(there, here)).as_posix()


def locate(reference: str, base: str | os.PathLike[str]) -> Path:
    """The path a :func:`relative_location` names, seen from the folder `base` (an absolute one as it is)."""
    return Path(base) / reference


_ABSOLUTE = re.compile(r"(?<![\w.~:/\\-])/(?:[^\s/'\"<>|]+/)+[^\s/'\"<>|:;,)]*")


def without_folders(value: Any, folders: Iterable[str | os.PathLike[str]] = ()) -> Any:
    """A JSON value whose texts name each of `folders` (absolute, as given or resolved) by its last part, the home
    folder as ``~``, and any other absolute path (``/a/b/c``) by its last part; relative paths stay as they are."""
    table: dict[str, str] = {}
    for folder in folders:
        for form in (os.path.abspath(folder), str(Path(folder).resolve())):
            if len(PurePath(form).parts) > 1:
                table[form] = folder_name(form)
    pattern = re.compile("|".join(re.escape(f) + r"(?![\w.-])" for f in sorted(table, key=len, reverse=True))) if table else None
    home = str(Path.home())

    def clean(text: str) -> str:
        if pattern is not None:
            text = pattern.sub(lambda m: table[m[0]], text)
        if len(home) > 1:
            text = re.sub(re.escape(home) + r"(?![\w.-])", "~", text)
        return _ABSOLUTE.sub(lambda m: PurePath(m[0].rstrip("/")).name, text)

    def walk(item: Any) -> Any:
        if isinstance(item, str):
            return clean(item)
        if isinstance(item, list):
            return [walk(v) for v in item]
        if isinstance(item, dict):
            return {k: walk(v) for k, v in item.items()}
        return item

    return walk(value)


def _is_path(text: str) -> bool:
    return (text.startswith(("/", "~")) or bool(re.match(r"^[A-Za-z]:[\\/]", text))) and "\n" not in text


class Identities:
    """One data set's clear identifiers - image paths and patient IDs - and their shareable forms.

    :meth:`text` replaces every known path (absolute, relative to the data folder, or the file name)
    and, where asked, every patient ID in a string; an identifier counts only where it is not glued to
    a letter or digit on either side (``IM-0121`` in ``IM-0121-0002.png``, not ``12`` in ``5123``).
    """

    def __init__(self, rows: Iterable[tuple[str, str]], *, salt: bytes):
        rows = [(str(path), str(patient or "")) for path, patient in rows]
        self.salt = salt
        folders = [os.path.dirname(path) for path, _ in rows if os.path.isabs(path)]
        common = Path(os.path.commonpath(folders)) if folders and len({Path(f).anchor for f in folders}) == 1 else None
        above_home = common is not None and Path.home().is_relative_to(common) and Path.home() != common
        self.root = None if common is None or len(common.parts) <= 1 or above_home else common  # else: file names only
        self._patient_of = {path: patient for path, patient in rows}
        self._patients = {p: salted_patient_id(p, salt) for _, p in rows if p and not p.startswith("pid-")}
        self._longest = max((len(text) for row in rows for text in row), default=0)
        self._paths: dict[str, str] = {}
        self._everything = dict(self._patients)
        names: dict[str, set[str]] = {}
        for path, _ in rows:
            shared = self.image(path)
            self._paths[path] = shared
            if self.root is not None and os.path.isabs(path):
                self._paths.setdefault(os.path.relpath(path, self.root), shared)
            names.setdefault(PurePath(path).name, set()).add(PurePath(shared).name)
        for name, forms in names.items():  # a file name two images share, under different patients, gets a hash
            self._paths.setdefault(name, next(iter(forms)) if len(forms) == 1 else f"img-{self._hash(name)}")
        if self.root is not None and not Path.home().is_relative_to(self.root):  # else text() writes it as ~
            self._paths.setdefault(str(self.root), self.root.name)
        self._everything = {**self._paths, **self._patients}

    def _hash(self, text: str) -> str:
        return hashlib.sha256(self.salt + text.encode("utf-8", "surrogateescape")).hexdigest()[:12]

    def patient(self, patient_id: str) -> str:
        """The salted hash of a patient ID (an ID that already is one stays as it is)."""
        return patient_id if patient_id.startswith("pid-") else salted_patient_id(patient_id, self.salt)

    def image(self, path: str) -> str:
        """An image path -> its path relative to the data folder (outside it: its file name), its patient ID
        hashed. A path this data set does not hold, or a relative one, gets every known identifier replaced
        (so a name already made shareable stays as it is)."""
        path = str(path)
        if path in self._paths:
            return self._paths[path]
        if not os.path.isabs(path):
            return self.text(path, patients=True)
        shown = os.path.relpath(path, self.root) if self.root is not None and _under(path, self.root) else PurePath(path).name
        patient = self._patient_of.get(path)
        if patient is None:
            return self.text(shown, patients=True)
        if not patient or patient.startswith("pid-"):
            return shown
        return _replace_bounded(shown, {patient: self.patient(patient)}, len(patient))

    def text(self, text: str, *, patients: bool = False) -> str:
        """`text` with every known path, and with `patients` every known patient ID, in its shareable form;
        absolute paths left over (not images of this data set) are cut to their last part."""
        table = self._everything if patients else self._paths
        text = _replace_bounded(text, table, self._longest)
        home = str(Path.home())
        if len(home) > 1 and home in text:
            text = text.replace(home, "~")
        return PurePath(text).name if _is_path(text) and " " not in text.strip() else text


def _under(path: str, root: Path) -> bool:
    try:
        return os.path.commonpath([path, str(root)]) == str(root)
    except ValueError:  # different drives
        return False


def _replace_bounded(text: str, table: Mapping[str, str], longest: int) -> str:
    """Each longest known key of `table` in `text`, where it is not glued to a letter or digit, replaced."""
    if not text or not table:
        return text
    n = len(text)
    glued = [i > 0 and i < n and text[i - 1].isalnum() and text[i].isalnum() for i in range(n + 1)]
    ends = [j for j in range(1, n + 1) if not glued[j]]
    out, i = [], 0
    while i < n:
        if not glued[i]:
            first, last = bisect_left(ends, i + 1), bisect_left(ends, i + longest + 1)
            match = next((j for j in reversed(ends[first:last]) if text[i:j] in table), None)
            if match is not None:
                out.append(table[text[i:match]])
                i = match
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


def run_identities(run_dir: Path, *, cache_dir: str | Path | None = None) -> Identities:
    """The identifiers of a run folder's data: split.csv, else its predictions files (an evaluation folder);
    the salt of `cache_dir` (default: the run's config.yaml ``cache_dir``, else the default cache)."""
    from medtransfer.config import default_cache_dir

    folder = RunDir(run_dir)
    config = folder.config() or {}
    rows: list[tuple[str, str]] = [(r.path, r.patient_id) for r in folder.split() or []]
    if not rows:
        for name in ("test", "val"):
            table = folder.predictions(name)
            if table is not None:
                rows += list(zip(table.paths, table.patient_ids or [""] * len(table.paths)))
    salt = local_salt(cache_dir or config.get("cache_dir") or default_cache_dir())
    return Identities(rows, salt=salt)


def deidentify_metrics(metrics: Mapping[str, Any], ids: Identities) -> dict[str, Any]:
    """A copy of metrics.json's content without identifiers: the leakage check's examples and near-duplicate
    pairs and the border check's captions with paths and patient IDs replaced, every other text value with
    paths replaced only (so that counts such as "test 17" stay as they are)."""
    out = _strings(copy.deepcopy(dict(metrics)), ids)
    clear, leakage = metrics.get("leakage"), out.get("leakage")
    if isinstance(clear, dict) and isinstance(leakage, dict):
        leakage["examples"] = [ids.text(str(x), patients=True) for x in clear.get("examples") or []]
        for pair, original in zip(leakage.get("near_duplicate_pairs") or [], clear.get("near_duplicate_pairs") or []):
            for key in ("path_a", "path_b"):
                if isinstance(pair, dict) and isinstance(original, dict) and isinstance(original.get(key), str):
                    pair[key] = ids.image(original[key])
    clear, border = metrics.get("border_evidence"), out.get("border_evidence")
    if isinstance(clear, dict) and isinstance(border, dict):
        for item, original in zip(border.get("gallery") or [], clear.get("gallery") or []):
            if isinstance(item, dict) and isinstance(original, dict) and isinstance(original.get("caption"), str):
                item["caption"] = ids.text(original["caption"], patients=True)
    return out


def _strings(value: Any, ids: Identities) -> Any:
    if isinstance(value, str):
        return ids.text(value)
    if isinstance(value, list):
        return [_strings(v, ids) for v in value]
    if isinstance(value, dict):
        return {k: _strings(v, ids) for k, v in value.items()}
    return value
