"""Quality measurement behind ``retrieval eval``: recall@K on pairs, zero-shot accuracy on labelled folders, parameter
sweeps."""
