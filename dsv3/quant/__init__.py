"""Weight formats and quantisation math, below `dsv3.model` (torch only).

    fp8.py      DeepSeek's block FP8: scale grids, (de)quantisation, the tiled FP8 linear — pure functions
    formats.py  the seam: `WeightFormat` objects (Plain, Fp8Blocks) that a layer holds and
                multiplies through, `Kernels` (the optional backend protocol), `DequantStats`
    intq.py     int8 per output channel and int4 per group (asymmetric, scale search, two packings) — pure functions
    int_formats.py  Int8PerChannel, Int4Grouped: the integer formats, PyTorch's int pack ops for few rows and
                dequantise-per-tile for many
"""

from dsv3.quant.formats import PLAIN, DequantStats, ExpertBatch, Fp8Blocks, Kernels, Plain, WeightFormat
from dsv3.quant.int_formats import Int4Grouped, Int8PerChannel

__all__ = ["PLAIN", "DequantStats", "ExpertBatch", "Fp8Blocks", "Int4Grouped", "Int8PerChannel", "Kernels", "Plain",
           "WeightFormat"]
