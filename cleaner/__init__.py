"""Stage 2: MetaCleaner module, K x N subset sampling, FAISS mining, label noise, head training."""
