"""Domain adaptation: ingest a document corpus, inspect its vocabulary, run staged training
(continued pre-training on the corpus, then instruction tuning) and measure forgetting."""
