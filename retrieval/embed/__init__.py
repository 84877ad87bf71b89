"""The embedding stage: items -> vectors through DataLoader workers (optionally encoding in the workers), resumable
progress shards, and the content-hash embedding cache."""
