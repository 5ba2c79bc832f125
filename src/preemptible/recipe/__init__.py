"""Building blocks of the reference recipe: a tiny GPT, byte-level text, an LR schedule."""
