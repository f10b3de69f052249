/* Writes full-resolution YCbCr pixels as a TIFF with subsampled chroma, in data units as TIFF
   6.0 (section 21) lays them out: each block's luma, then its Cb and Cr averaged (edge blocks
   repeat the last row and column). Compression, strips or tiles and byte order are libtiff's.
   ycbcr_tiff OUT WIDTH HEIGHT H V COMPRESSION ROWS TILE ORDER(l|b) TAG(0|1) < ycbcr.raw
   ROWS is the rows per strip when TILE is 0; TAG 0 leaves the subsampling tag out (2x2). */
#include <stdio.h>
#include <stdlib.h>
#include <tiffio.h>
static int w, h, hs, vs;
static unsigned char *px;
static unsigned char at(int x, int y, int c) {
  x = x < w ? x : w - 1; y = y < h ? y : h - 1;
  return px[((size_t)y * w + x) * 3 + c];
}
/* The data units of the cw x ch pixels at (x0, y0); returns their size. */
static size_t units(unsigned char *out, int x0, int y0, int cw, int ch) {
  size_t n = 0;
  for (int uy = 0; uy < (ch + vs - 1) / vs; uy++)
    for (int ux = 0; ux < (cw + hs - 1) / hs; ux++) {
      int x = x0 + ux * hs, y = y0 + uy * vs, cb = 0, cr = 0;
      for (int j = 0; j < vs; j++)
        for (int i = 0; i < hs; i++) {
          out[n++] = at(x + i, y + j, 0); cb += at(x + i, y + j, 1); cr += at(x + i, y + j, 2);
        }
      out[n++] = (cb + hs * vs / 2) / (hs * vs); out[n++] = (cr + hs * vs / 2) / (hs * vs);
    }
  return n;
}
int main(int argc, char **argv) {
  if (argc != 11) return 2;
  w = atoi(argv[2]); h = atoi(argv[3]); hs = atoi(argv[4]); vs = atoi(argv[5]);
  int rows = atoi(argv[7]), tile = atoi(argv[8]);
  px = malloc((size_t)w * h * 3);
  if (fread(px, 3, (size_t)w * h, stdin) != (size_t)w * h) return 1;
  TIFF *t = TIFFOpen(argv[1], argv[9][0] == 'b' ? "wb" : "wl");
  TIFFSetField(t, TIFFTAG_IMAGEWIDTH, w); TIFFSetField(t, TIFFTAG_IMAGELENGTH, h);
  TIFFSetField(t, TIFFTAG_BITSPERSAMPLE, 8); TIFFSetField(t, TIFFTAG_SAMPLESPERPIXEL, 3);
  TIFFSetField(t, TIFFTAG_PHOTOMETRIC, PHOTOMETRIC_YCBCR);
  TIFFSetField(t, TIFFTAG_PLANARCONFIG, PLANARCONFIG_CONTIG);
  TIFFSetField(t, TIFFTAG_COMPRESSION, atoi(argv[6]));
  if (atoi(argv[10])) TIFFSetField(t, TIFFTAG_YCBCRSUBSAMPLING, hs, vs);
  unsigned char *buf = malloc((size_t)w * h * 6 + 64 * 64 * 6);
  if (tile) {
    TIFFSetField(t, TIFFTAG_TILEWIDTH, tile); TIFFSetField(t, TIFFTAG_TILELENGTH, tile);
    for (int y = 0; y < h; y += tile)
      for (int x = 0; x < w; x += tile)
        TIFFWriteEncodedTile(t, TIFFComputeTile(t, x, y, 0, 0), buf, units(buf, x, y, tile, tile));
  } else {
    TIFFSetField(t, TIFFTAG_ROWSPERSTRIP, rows);
    for (int y = 0; y < h; y += rows)
      TIFFWriteEncodedStrip(t, y / rows, buf, units(buf, 0, y, w, y + rows < h ? rows : h - y));
  }
  TIFFClose(t);
  return 0;
}
