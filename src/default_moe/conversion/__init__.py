"""Checkpoint conversion: Mixtral/OLMoE/FlexOlmo/Qwen3-MoE/Qwen2-MoE -> Default MoE, sparse upcycling of dense
models, and export back.

`convert(src, dst, **options)` and `export(src, dst, to=...)` return the output folder; the command line is
`default-moe convert` / `default-moe export`. See docs/conversion.md.
"""

from .api import SOURCE_TYPES, convert, export
from .io import ConversionError

__all__ = ["SOURCE_TYPES", "ConversionError", "convert", "export"]
