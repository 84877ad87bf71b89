"""Types every stage shares: errors, config dataclasses that round-trip to JSON, hit types, atomic writes,
build ids and digests, the version.

The lowest layer: it imports no other part of the package.
"""
