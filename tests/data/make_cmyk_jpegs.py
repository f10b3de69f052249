"""Makes the CMYK JPEGs and Pillow's RGB of each as a PNG: the reference `tests/preprocess.rs`
checks imgclf's decoding against. Run from this directory with Pillow 13, a C compiler and
libjpeg-turbo's jpegtran and headers (Debian's libjpeg-turbo-progs and libjpeg-dev):
python3 make_cmyk_jpegs.py ../../../shared/images/darknet_dog.jpg
Wide, so that the model's crop leaves columns out. ycck.jpg holds the same inks as YCCK
(luma and black whole, chroma halved both ways), as Photoshop writes CMYK JPEGs, through
libjpeg (ycck.c): Pillow cannot write that colour space."""

import os
import subprocess
import sys
import tempfile

from PIL import Image

photo = Image.open(sys.argv[1]).convert("RGB").resize((128, 48))
photo.convert("CMYK").save("cmyk.jpg", quality=90)
cmyk = Image.open("cmyk.jpg")
cmyk.convert("RGB").save("cmyk_rgb.png")
for option, name in (("-progressive", "cmyk_progressive.jpg"), ("-arithmetic", "cmyk_arithmetic.jpg")):
    with open(name, "wb") as out:
        subprocess.run(["jpegtran", option, "cmyk.jpg"], stdout=out, check=True)
    assert Image.open(name).convert("RGB").tobytes() == Image.open("cmyk_rgb.png").tobytes()

with tempfile.TemporaryDirectory() as tmp:
    writer = os.path.join(tmp, "ycck")
    subprocess.run(["cc", "-O2", "-o", writer, "ycck.c", "-ljpeg"], check=True)
    inverted = bytes(255 - b for b in cmyk.tobytes())  # the inks as the file stores them
    ycck = subprocess.run([writer, *map(str, cmyk.size)], input=inverted, capture_output=True, check=True)
with open("ycck.jpg", "wb") as out:
    out.write(ycck.stdout)
assert Image.open("ycck.jpg").info["adobe_transform"] == 2
Image.open("ycck.jpg").convert("RGB").save("ycck_rgb.png")
