"""The manifest of verified image files: a dataset tree is checked once, not at every start-up.

Decoding every image of DomainNet (~586,000 files) takes minutes; every run of a sweep would do
it again. The manifest remembers, for each file that passed the check, its path relative to the
data root, size, modification time (ns) and how far it was checked ("header" or "decode"). A
later start-up checks only the files whose (path, size, mtime) is not in it: new and changed
files are checked again, entries of removed files are dropped, and a bad file, never recorded,
is checked (and named) every time.

Where it lives (`location`): in the folder given as `cache_dir`, else in `$FQAT_TF_CACHE`, else
in the data root itself (`.fqat_tf_manifest.json`, hidden, so no listing sees it) when the root
is writable, else in `~/.cache/fqat_tf/manifests/`. In a cache folder the file is named by a hash
of the root's real path, so one folder serves every dataset.

Several runs may start at once (a sweep): the check runs under an exclusive lock beside the
manifest, so the first run checks the files and the others wait and then find them recorded;
the manifest is written atomically (temporary file, then rename), entries of other domain
folders kept. A manifest that cannot be read is ignored, one that cannot be written is
skipped with a warning: it only saves time.
"""
import contextlib
import hashlib
import json
import logging
import os
from typing import Callable, Dict, List, Sequence

from fqat_tf import defaults, rundir

FORMAT = 1
_LEVELS = {"header": 1, "decode": 2}

log = logging.getLogger(__name__)


def location(root: str, cache_dir=None) -> str:
    """The manifest file of the data root `root`."""
    folder = cache_dir or os.environ.get(defaults.DATA_CACHE_ENV)
    if folder is None and os.access(root, os.W_OK):
        return os.path.join(root, defaults.MANIFEST_NAME)
    folder = os.path.expanduser(folder or defaults.DATA_CACHE_DIR)
    real = os.path.realpath(root).encode("utf-8", "surrogateescape")
    return os.path.join(folder, "manifests", hashlib.sha256(real).hexdigest()[:16] + ".json")


def _read(path: str, root: str) -> Dict[str, list]:
    try:
        with open(path) as f:
            content = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring the unreadable manifest %s (%s)", path, e)
        return {}
    if (not isinstance(content, dict) or content.get("format") != FORMAT
            or content.get("root") != os.path.realpath(root)
            or not isinstance(content.get("files"), dict)):
        return {}
    return content["files"]


def _in_scope(relative: str, scope: Sequence[str]) -> bool:
    return any(relative.startswith(folder + os.sep) for folder in scope)


def _save(path, root, scope, entries, on_disk):
    """Writes `entries` for the folders in `scope`, keeping the other entries of `on_disk`."""
    files = {rel: e for rel, e in on_disk.items() if not _in_scope(rel, scope)}
    files.update(entries)
    if files == on_disk:
        return
    content = {"format": FORMAT, "root": os.path.realpath(root), "files": files}
    try:
        rundir.atomic_write(path, json.dumps(content, separators=(",", ":")))
    except OSError as e:
        log.warning("could not save the manifest %s (%s); the next start-up checks every "
                    "file again", path, e)


def check_files(root: str, paths: Sequence[str], scope: Sequence[str], verify: str,
                checker: Callable[[Sequence[str], str], List[str]], cache_dir=None
                ) -> List[str]:
    """Returns the bad files among `paths`, checking only those the manifest does not vouch for.

    Args:
        root: the data root.
        paths: the files found under the folders `scope` of `root`.
        scope: folders relative to `root` (the domain folders) that `paths` lists completely:
            entries under them not in `paths` are dropped.
        verify: "header" or "decode"; a file recorded at "decode" passes "header".
        checker: `(paths, verify) -> bad paths`, the actual check.
        cache_dir: where the manifest is kept (see `location`).

    Returns:
        The bad files, in the order of `paths`.
    """
    path = location(root, cache_dir)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(rundir.exclusive(path + ".lock"))
        except OSError as e:
            log.warning("could not lock the manifest %s (%s); checking without it", path, e)
        return _check_locked(root, paths, scope, verify, checker, path)


def _relative(paths, root):
    # The listing joins every path onto `root`: cutting the prefix is os.path.relpath's result
    # at a tenth of its cost (it was half of a start-up's time).
    prefix = os.path.join(root, "")
    return [p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, root) for p in paths]


def _check_locked(root, paths, scope, verify, checker, path):
    known = _read(path, root)
    entries, unknown = {}, []
    relatives = dict(zip(paths, _relative(paths, root)))
    for p in paths:
        relative = relatives[p]
        try:
            st = os.stat(p)
        except OSError:
            unknown.append(p)  # A dangling link or an unreadable file: the checker names it.
            continue
        entry = known.get(relative)
        if isinstance(entry, list) and len(entry) == 3 \
                and entry[:2] == [st.st_size, st.st_mtime_ns] \
                and _LEVELS.get(entry[2], 0) >= _LEVELS[verify]:
            entries[relative] = entry
        else:
            entries[relative] = [st.st_size, st.st_mtime_ns, verify]
            unknown.append(p)
    bad = set(checker(unknown, verify))
    for p in bad:
        entries.pop(relatives[p], None)
    _save(path, root, scope, entries, known)
    return [p for p in paths if p in bad]
