"""Built-in models: no downloads needed."""

from fxmem.models.gpt import GPT, GPTConfig, example_batch, tiny_gpt

__all__ = ["GPT", "GPTConfig", "example_batch", "tiny_gpt"]
