"""Sparse updates: the delta file format and (with the sparse methods) the sparse-gradient machinery."""
