"""Makes the TIFFs that the `image` crate refuses, and Pillow's RGB of each as a PNG: the
reference `tests/preprocess.rs` checks imgclf's decoding against. Run from this directory with
Pillow 13 and numpy: python3 make_tiffs.py ../../../shared/images/darknet_dog.jpg
(palette8.tif, palette8_lzw.tif and palette8_rgb.png came before it, from the same photo.)"""

import sys

import numpy as np
from PIL import Image, TiffImagePlugin

photo = Image.open(sys.argv[1]).convert("RGB").resize((64, 48))
grey = np.asarray(photo.convert("L")).astype(np.float32)
floats = grey * 1.3 - 20.5  # below 0 and above 255, with fractions
floats[0, 0] = np.nan

files = {
    "palette8_alpha.tif": (photo.convert("P").convert("PA"), {"compression": "tiff_lzw"}),
    "greyalpha8.tif": (photo.convert("LA"), {"compression": "tiff_adobe_deflate"}),
    "ycbcr8.tif": (photo.convert("YCbCr"), {}),
    "lab8.tif": (photo.convert("LAB"), {"compression": "tiff_lzw"}),
    "int32.tif": (Image.fromarray((grey * 2 - 100).astype(np.int32), "I"), {}),
    "float32.tif": (Image.fromarray(floats, "F"), {"compression": "tiff_lzw"}),
}
for name, (image, options) in files.items():
    image.save(name, **options)
    Image.open(name).convert("RGB").save(name.replace(".tif", "_rgb.png"))

# The palette TIFF with an orientation tag (6: turn 90 degrees clockwise). Its reference is
# palette8_rgb.png turned, not Pillow's reading: Pillow turns the pixels of such a TIFF but not
# its size.
tags = TiffImagePlugin.ImageFileDirectory_v2()
tags[274] = 6
tags.tagtype[274] = 3
Image.open("palette8.tif").save("palette8_orient6.tif", tiffinfo=tags)

# The same images in other layouts, with libtiff's tiffcp (Debian's libtiff-tools):
#   tiffcp -p separate palette8_alpha.tif palette8_alpha_planar.tif
#   tiffcp -B -t -w 16 -l 16 greyalpha8.tif greyalpha8_tiled_be.tif
#   tiffcp -B -p separate -c zip:p2 lab8.tif lab8_planar_be.tif
