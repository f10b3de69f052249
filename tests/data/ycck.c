/* Writes the inks of a raw CMYK file (Adobe's inverted convention, as Pillow's CMYK JPEGs
   store them) as a YCCK JPEG: ycck WIDTH HEIGHT < inks.raw > ycck.jpg */
#include <stdio.h>
#include <stdlib.h>
#include <jpeglib.h>
int main(int argc, char **argv) {
  int w = atoi(argv[1]), h = atoi(argv[2]);
  unsigned char *px = malloc((size_t)w * h * 4);
  if (fread(px, 4, (size_t)w * h, stdin) != (size_t)w * h) return 1;
  struct jpeg_compress_struct c; struct jpeg_error_mgr e;
  c.err = jpeg_std_error(&e); jpeg_create_compress(&c); jpeg_stdio_dest(&c, stdout);
  c.image_width = w; c.image_height = h; c.input_components = 4; c.in_color_space = JCS_CMYK;
  jpeg_set_defaults(&c); jpeg_set_colorspace(&c, JCS_YCCK); jpeg_set_quality(&c, 90, TRUE);
  jpeg_start_compress(&c, TRUE);
  for (int y = 0; y < h; y++) { JSAMPROW row = px + (size_t)y * w * 4; jpeg_write_scanlines(&c, &row, 1); }
  jpeg_finish_compress(&c); jpeg_destroy_compress(&c); return 0;
}
