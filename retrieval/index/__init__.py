"""Vector indexes: index types and ``auto`` under a memory budget, vector sources over float16 shards, FAISS
build/search with knobs and deletions, recall against exact search and knob tuning, placement on CPU or GPU."""
