"""Serve reference banks: open a bank, search it, segment images by retrieval (to be built)."""
