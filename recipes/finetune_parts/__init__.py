"""The reference recipe's building blocks: a toy GPT, byte-level data, LR schedules, the recipe's
settings checks, and the Hydra glue. The library never imports them (nor Hydra or OmegaConf)."""
