"""The inbox's naming rules, one of each: which names it ignores, and which file is an
input's sidecar. Shared by the intake (what it claims) and `batchd submit` (what it may
place there), and light on purpose: the client imports it."""

from __future__ import annotations

# Names a writer uses while a file is written (Maildir, copy tools, editors).
TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", "~", ".swp")
# An input's options: NAME.meta.json beside NAME.jsonl (or NAME.csv).
SIDECAR_SUFFIX = ".meta.json"
SIDECAR_SUFFIXES = (SIDECAR_SUFFIX,)


def is_ignored_name(name: str) -> bool:
    """PURE: a name the intake never claims: hidden or temporary (the Maildir
    convention and common copy tools use them while a file is written), or a sidecar."""
    lower = name.lower()
    return (
        name.startswith((".", "~"))
        or lower.endswith(TEMP_SUFFIXES)
        or "~syncthing~" in lower
        or lower.endswith(SIDECAR_SUFFIXES)
    )
