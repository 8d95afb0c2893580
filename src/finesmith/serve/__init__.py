"""Talk to a fine-tuned model: a terminal chat and an OpenAI-compatible HTTP server."""
