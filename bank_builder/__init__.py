"""Build reference banks: WebDataset corpora → segment embeddings → Parquet parts (+ index)."""
