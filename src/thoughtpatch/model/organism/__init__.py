"""The organism: a tiny CODI (LLaMA architecture) trained here on synthetic arithmetic.
Tokenizer, architecture, training loop and export; the shipped model is `thoughtpatch/toy/`."""
