//! Pillow's antialiased bilinear resampling (`Image.resize(..., BILINEAR)`), bit for bit.
//!
//! The reference results come from Pillow, and its fixed-point arithmetic differs from other
//! resizers by one level on many pixels, enough to move a probability by 0.01. So this follows
//! `libImaging/Resample.c`: double-precision filter weights normalised per output pixel, rounded
//! to 22-bit fixed point, a horizontal pass into an 8-bit intermediate, then a vertical pass.
//! Only the pixels inside the crop window are computed; each is computed exactly as Pillow would
//! compute it for the full image.

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The part of the resized image that is kept.
#[derive(Clone, Copy, Debug)]
pub(super) struct Window {
    pub left: usize,
    pub top: usize,
    pub width: usize,
    pub height: usize,
}

/// Per output pixel: the first input pixel, the number of inputs, and their weights.
struct Coefficients {
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
    ksize: usize,
}

fn bilinear(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// `precompute_coeffs` followed by `normalize_coeffs_8bpc`.
fn coefficients(in_size: u32, out_size: u32) -> Coefficients {
    let scale = f64::from(in_size) / f64::from(out_size);
    let filterscale = scale.max(1.0);
    let support = filterscale; // the bilinear filter's support is 1
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size as usize);
    let mut weights = vec![0i32; out_size as usize * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size as usize {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size)) as usize - xmin;
        let mut ww = 0.0;
        for (x, slot) in k.iter_mut().enumerate().take(xmax) {
            let w = bilinear(((x + xmin) as f64 - center + 0.5) * ss);
            *slot = w;
            ww += w;
        }
        for (x, &w) in k.iter().enumerate().take(xmax) {
            let w = if ww != 0.0 { w / ww } else { w };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            weights[xx * ksize + x] = if w < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coefficients {
        bounds,
        weights,
        ksize,
    }
}

fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes a packed RGB8 image to `new_w` x `new_h` and returns the `window` of the result, as
/// packed RGB8 rows.
pub(super) fn resize_window(
    src: &[u8],
    width: u32,
    height: u32,
    new_w: u32,
    new_h: u32,
    window: Window,
) -> Vec<u8> {
    let w = width as usize;
    let Window {
        left,
        top,
        width: out_w,
        height: out_h,
    } = window;

    // Horizontal pass over just the source rows the vertical pass will read.
    let vertical = (new_h != height).then(|| coefficients(height, new_h));
    let (first_row, last_row) = match &vertical {
        Some(c) => {
            let (last_min, last_len) = c.bounds[top + out_h - 1];
            (c.bounds[top].0, last_min + last_len)
        }
        None => (top, top + out_h),
    };
    let rows = last_row - first_row;
    let mut temp = vec![0u8; rows * out_w * 3];
    if new_w != width {
        let c = coefficients(width, new_w);
        for (y, out_row) in temp.chunks_exact_mut(out_w * 3).enumerate() {
            let in_row = &src[(first_row + y) * w * 3..][..w * 3];
            for (x, out) in out_row.chunks_exact_mut(3).enumerate() {
                let (xmin, len) = c.bounds[left + x];
                let k = &c.weights[(left + x) * c.ksize..][..len];
                let mut sums = [1i32 << (PRECISION_BITS - 1); 3];
                for (px, &weight) in in_row[xmin * 3..(xmin + len) * 3].chunks_exact(3).zip(k) {
                    sums[0] += i32::from(px[0]) * weight;
                    sums[1] += i32::from(px[1]) * weight;
                    sums[2] += i32::from(px[2]) * weight;
                }
                out.copy_from_slice(&sums.map(clip8));
            }
        }
    } else {
        for (y, out_row) in temp.chunks_exact_mut(out_w * 3).enumerate() {
            out_row.copy_from_slice(&src[((first_row + y) * w + left) * 3..][..out_w * 3]);
        }
    }

    let Some(c) = vertical else { return temp };
    let stride = out_w * 3;
    let mut out = vec![0u8; out_h * stride];
    for (y, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let (ymin, len) = c.bounds[top + y];
        let k = &c.weights[(top + y) * c.ksize..][..len];
        let base = ymin - first_row;
        for (i, value) in out_row.iter_mut().enumerate() {
            let mut sum = 1i32 << (PRECISION_BITS - 1);
            for (j, &weight) in k.iter().enumerate() {
                sum += i32::from(temp[(base + j) * stride + i]) * weight;
            }
            *value = clip8(sum);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (from, to) in [(512, 256), (768, 341), (300, 256), (2560, 409), (256, 256)] {
            let c = coefficients(from, to);
            for (x, &(_, len)) in c.bounds.iter().enumerate() {
                let sum: i64 = c.weights[x * c.ksize..][..len]
                    .iter()
                    .map(|&w| i64::from(w))
                    .sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= len as i64,
                    "{from}->{to} at {x}"
                );
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat() {
        let src = vec![77u8; 500 * 300 * 3];
        let window = Window {
            left: 10,
            top: 5,
            width: 100,
            height: 80,
        };
        let out = resize_window(&src, 500, 300, 426, 256, window);
        assert_eq!(out.len(), 100 * 80 * 3);
        assert!(out.iter().all(|&v| v == 77));
    }
}
