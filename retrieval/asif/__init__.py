"""ASIF (arXiv 2210.01738): relative representations over anchor pairs, sparse search, the dense projected route,
fusion of anchor sets and routes, the linear baseline, and anchor sets on disk."""
