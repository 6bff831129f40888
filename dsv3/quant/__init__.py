"""Weight formats and quantisation math, below `dsv3.model` (torch only).

    fp8.py      DeepSeek's block FP8: scale grids, (de)quantisation, the tiled FP8 linear — pure functions
    formats.py  the seam: `WeightFormat` objects (Plain, Fp8Blocks; int8/int4 next) that a layer holds and
                multiplies through, `Kernels` (the optional backend protocol), `DequantStats`
"""

from dsv3.quant.formats import PLAIN, DequantStats, ExpertBatch, Fp8Blocks, Kernels, Plain, WeightFormat

__all__ = ["PLAIN", "DequantStats", "ExpertBatch", "Fp8Blocks", "Kernels", "Plain", "WeightFormat"]
