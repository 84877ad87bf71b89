"""The directory format shared by indexes and anchor sets (format v1).

A directory holds data files whose names carry a build id, and one
``manifest.json`` that names the files of the current build with their sizes
and sha256. The manifest is written last and atomically: it is the commit
point. A build killed half way leaves only unreferenced files behind, and the
previous manifest (and so the previous index) intact; the next successful
commit removes the leftovers, temporary files included.

Writers. One build at a time: :func:`retrieval.store.locking.writer_lock` holds an
``fcntl.flock`` on ``<dir>/.lock`` around a build, so a second writer fails at
once with ``IndexLockedError`` instead of deleting the first one's files.

Readers never take the lock. A commit deletes the files of the build it
replaces right away, so a reader must not depend on finding them by name
later. :class:`StoreReader` therefore *pins* its snapshot: when it opens a
directory it opens every file its manifest names (the build's list of skipped
items included: ``items/<build>-errors.jsonl``; the top-level ``errors.jsonl``
is a copy for people, replaced only after the manifest commit) and keeps the descriptors; all later reads go through
them. On POSIX a deleted file stays readable through an open descriptor, so a
reader keeps answering from the build it opened, consistently, however many
commits happen after (it sees the new build when it is opened again). The only race left is at
open time: a commit can land between reading the manifest and opening the
files; the reader then finds the manifest changed and starts over with the new
one. (Keeping old builds' files for a grace period was the alternative; it
only narrows the window, costs disk, and a slow reader can still lose.)

Untrusted files. Nothing is ever unpickled (``allow_pickle=False``; object
arrays are refused). Sizes are checked when a directory is opened; sha256
against the manifest's ``checksums`` when a file is read, on the very bytes
that are then parsed. FAISS and parquet files are parsed by native code, so
they are always verified (and a flat FAISS index's header is also checked
against its size before FAISS sees it); ``StoreReader(..., verify=False)``
skips hashing only the numpy files (``.npy``/``.npz``), which numpy parses in
Python and which can be large. The manifest carries ``manifest_sha256`` over
its own canonical JSON, so an edited or bit-flipped manifest is refused too
(a manifest without it, from before, is accepted). Every problem is an
``IndexFormatError`` naming the file.
"""
