"""Makes the YCbCr TIFFs with subsampled chroma and Pillow's RGB of each as a PNG: the
reference `tests/preprocess.rs` checks imgclf's decoding against. Pillow cannot write them, so
libtiff does (ycbcr_tiff.c). Run from this directory with Pillow 13, a C compiler, libtiff's
headers and tiff2rgba (Debian's libtiff-dev and libtiff-tools):
python3 make_ycbcr_tiffs.py ../../../shared/images/darknet_dog.jpg
The reference is libtiff's RGBA interface (tiff2rgba), which repeats each block's chroma over
its pixels. Pillow reads compressed YCbCr TIFFs through it, to the same RGB; uncompressed ones
it reads as if they were not subsampled, and fails."""

import os
import subprocess
import sys
import tempfile

from PIL import Image

NONE, LZW, PACKBITS, DEFLATE = 1, 5, 32773, 8
# Name, size, subsampling, compression, rows per strip, tile size, byte order, tag written.
# Odd sizes leave blocks, strips and tiles cut at the edges.
files = [
    ("ycbcr22.tif", (61, 45), (2, 2), LZW, 8, 0, "l", 1),
    ("ycbcr21_be.tif", (64, 48), (2, 1), DEFLATE, 5, 0, "b", 1),
    ("ycbcr41.tif", (63, 48), (4, 1), PACKBITS, 48, 0, "l", 1),
    ("ycbcr42_tiled.tif", (61, 45), (4, 2), NONE, 0, 16, "l", 1),
    ("ycbcr44_tiled_be.tif", (64, 48), (4, 4), LZW, 0, 32, "b", 1),
    ("ycbcr_untagged.tif", (64, 47), (2, 2), DEFLATE, 16, 0, "l", 0),  # TIFF's default: 2x2
]
photo = Image.open(sys.argv[1]).convert("RGB")
with tempfile.TemporaryDirectory() as tmp:
    writer = os.path.join(tmp, "ycbcr_tiff")
    subprocess.run(["cc", "-O2", "-o", writer, "ycbcr_tiff.c", "-ltiff"], check=True)
    for name, size, (h, v), compression, rows, tile, order, tag in files:
        ycbcr = photo.resize(size).convert("YCbCr").tobytes()
        args = [name, *size, h, v, compression, rows, tile, order, tag]
        subprocess.run([writer, *map(str, args)], input=ycbcr, check=True)
        rgb = os.path.join(tmp, "rgb.tif")
        subprocess.run(["tiff2rgba", "-n", "-c", "none", name, rgb], check=True)
        reference = Image.open(rgb).convert("RGB")
        reference.save(name.replace(".tif", "_rgb.png"))
        if compression != NONE:
            assert Image.open(name).convert("RGB").tobytes() == reference.tobytes()
