"""Triton serving: tokenizer, model repository rendering, server launcher, clients."""
