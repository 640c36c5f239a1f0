//! Layout changes between channel planes (`[channels][n]`: how the plans hold values) and
//! channels-last pixels (`[n][stride]`: how the depthwise and GEMM-based kernels read and write
//! them): plain copies, sixteen bytes or four 32-bit values square at a time by SSE2 transposes on
//! x86-64 (every x86-64 CPU has SSE2), one value at a time for what is left and elsewhere.

/// A value the layout changes move a square block at a time: sixteen bytes, or four 32-bit
/// values, per side (one SSE2 register per row).
pub trait Transposable: Copy + Default {
    /// The block's side.
    const BLOCK: usize;

    /// The block of columns `p0..p0 + BLOCK` of the `BLOCK` rows `rows`, transposed:
    /// `write(j, column)` for each `j < BLOCK` with `column[i] = rows[i][p0 + j]`.
    #[cfg(target_arch = "x86_64")]
    fn transpose_block(rows: &[&[Self]], p0: usize, write: impl FnMut(usize, &[Self]));
}

impl Transposable for u8 {
    const BLOCK: usize = 16;

    #[cfg(target_arch = "x86_64")]
    fn transpose_block(rows: &[&[u8]], p0: usize, mut write: impl FnMut(usize, &[u8])) {
        let block: [&[u8; 16]; 16] = std::array::from_fn(|i| rows[i][p0..p0 + 16].try_into().expect("16 values"));
        for (j, column) in sse2::transpose16(&block).iter().enumerate() {
            write(j, column);
        }
    }
}

macro_rules! transposable_32 {
    ($($t:ty),*) => {$(
        impl Transposable for $t {
            const BLOCK: usize = 4;

            #[cfg(target_arch = "x86_64")]
            fn transpose_block(rows: &[&[$t]], p0: usize, mut write: impl FnMut(usize, &[$t])) {
                let block: [&[$t; 4]; 4] = std::array::from_fn(|i| rows[i][p0..p0 + 4].try_into().expect("4 values"));
                for (j, column) in sse2::transpose4(&block).iter().enumerate() {
                    write(j, column);
                }
            }
        }
    )*};
}
transposable_32!(i32, f32);

/// Where the pixels of a plane (row-major, rows `width` long) land among channels-last pixels:
/// pixel `p` at `origin + (p / width) · row_pitch + (p % width) · pixel_pitch` (each position the
/// first of its pixel's channels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PixelMap {
    /// Pixels per row.
    pub width: usize,
    /// Where the first pixel lands.
    pub origin: usize,
    /// Steps between rows.
    pub row_pitch: usize,
    /// Steps between the pixels of a row.
    pub pixel_pitch: usize,
}

impl PixelMap {
    /// A plane of rows `width` long into a zero-padded channels-last image of `channels` per
    /// pixel, `padded_width` pixels per row, the plane at `padding` (rows, columns).
    pub fn padded(width: usize, padding: [usize; 2], padded_width: usize, channels: usize) -> Self {
        let [ph, pw] = padding;
        Self {
            width,
            origin: (ph * padded_width + pw) * channels,
            row_pitch: padded_width * channels,
            pixel_pitch: channels,
        }
    }

    /// Pixels one after another, `pitch` apart, from `origin` (one row).
    pub fn dense(origin: usize, pitch: usize) -> Self {
        Self { width: usize::MAX, origin, row_pitch: 0, pixel_pitch: pitch }
    }

    /// Where pixel `p` lands (the definition).
    pub fn at(&self, p: usize) -> usize {
        self.origin + (p / self.width) * self.row_pitch + (p % self.width) * self.pixel_pitch
    }

    /// [`Self::at`] for `p = 0, 1, …`, one step at a time (no division per pixel).
    fn walk(&self) -> impl FnMut() -> usize + '_ {
        let (mut at, mut column) = (self.origin, 0);
        move || {
            let here = at;
            column += 1;
            if column == self.width {
                column = 0;
                at = at + self.row_pitch - (self.width - 1) * self.pixel_pitch;
            } else {
                at += self.pixel_pitch;
            }
            here
        }
    }
}

/// Channel planes to channels-last pixels: `dst[map.at(p) + ch] = planes[ch · n + p]` for
/// `ch < channels`, `p < n` (bytes, `i32` or `f32`). `room` is how many channels each
/// destination pixel holds: where it reaches past the channels to the next multiple of the
/// transposes' block, the last block is moved whole, the channels past `channels` getting
/// copies of the last channel's values (for layouts whose padding channels are never read into
/// a result: zero weights, dropped sums); otherwise they are not written.
///
/// # Panics
/// When `planes` is shorter than `channels · n`, `room < channels`, or a destination is out of
/// `dst`.
pub fn planes_to_pixels<T: Transposable>(
    planes: &[T],
    channels: usize,
    n: usize,
    dst: &mut [T],
    map: PixelMap,
    room: usize,
) {
    assert!(planes.len() >= channels * n, "the planes are shorter than [channels][n]");
    assert!(room >= channels, "room for {room} of {channels} channels");
    #[cfg(not(target_arch = "x86_64"))]
    let ch0 = 0;
    #[cfg(target_arch = "x86_64")]
    let ch0 = {
        let b = T::BLOCK;
        let whole = if room >= channels.div_ceil(b) * b { channels.div_ceil(b) * b } else { channels / b * b };
        let mut ch0 = 0;
        while ch0 < whole {
            let rows: [&[T]; 16] =
                std::array::from_fn(|i| if i < b { &planes[(ch0 + i).min(channels - 1) * n..][..n] } else { &[] });
            let rows = &rows[..b];
            let mut next = map.walk();
            let mut p0 = 0;
            while p0 + b <= n {
                T::transpose_block(rows, p0, |_, pixel| dst[next() + ch0..][..b].copy_from_slice(pixel));
                p0 += b;
            }
            for p in p0..n {
                for (v, row) in dst[next() + ch0..][..b].iter_mut().zip(rows) {
                    *v = row[p];
                }
            }
            ch0 += b;
        }
        ch0
    };
    if ch0 < channels {
        let mut next = map.walk();
        for p in 0..n {
            let d = &mut dst[next() + ch0..][..channels - ch0];
            for (i, v) in d.iter_mut().enumerate() {
                *v = planes[(ch0 + i) * n + p];
            }
        }
    }
}

/// Channels-last pixels of 32-bit values back to planes: `out[ch · n + p] = pixels[p · ld + ch]`
/// for `ch < channels`, `p < n`.
///
/// # Panics
/// When a slice is shorter than its shape.
pub fn pixels_to_planes_32<T: Copy + Default>(pixels: &[T], n: usize, ld: usize, channels: usize, out: &mut [T]) {
    assert!(channels <= ld && out.len() >= channels * n, "short output or ld below the channels");
    #[cfg(not(target_arch = "x86_64"))]
    let p0 = 0;
    #[cfg(target_arch = "x86_64")]
    let mut p0 = 0;
    #[cfg(target_arch = "x86_64")]
    while p0 + 4 <= n {
        let mut ch = 0;
        while ch + 4 <= channels {
            let rows: [&[T; 4]; 4] =
                std::array::from_fn(|i| pixels[(p0 + i) * ld + ch..][..4].try_into().expect("4 values"));
            sse2::transpose4_into(&rows, out, ch * n + p0, n);
            ch += 4;
        }
        for ch in ch..channels {
            for p in p0..p0 + 4 {
                out[ch * n + p] = pixels[p * ld + ch];
            }
        }
        p0 += 4;
    }
    for p in p0..n {
        for ch in 0..channels {
            out[ch * n + p] = pixels[p * ld + ch];
        }
    }
}

/// The transposes on SSE2, which every x86-64 CPU has.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)] // unaligned loads and stores of 16 bytes, in bounds by their array types
mod sse2 {
    use std::arch::x86_64::*;

    /// A 16×16 byte matrix transposed: `out[j][i] = rows[i][j]`, by four rounds of unpacking.
    pub(super) fn transpose16(rows: &[&[u8; 16]; 16]) -> [[u8; 16]; 16] {
        // SAFETY: each load reads the 16 bytes of one array; SSE2 is part of x86-64.
        let a: [__m128i; 16] = std::array::from_fn(|i| unsafe { _mm_loadu_si128(rows[i].as_ptr().cast()) });
        // Bytes of row pairs interleaved: 16-bit lanes (a2k[j], a2k+1[j]).
        let b: [__m128i; 16] = std::array::from_fn(|i| {
            let (k, hi) = (i / 2, i % 2 == 1);
            // SAFETY: register operations of SSE2, part of x86-64.
            unsafe {
                if hi { _mm_unpackhi_epi8(a[2 * k], a[2 * k + 1]) } else { _mm_unpacklo_epi8(a[2 * k], a[2 * k + 1]) }
            }
        });
        // 32-bit lanes of four rows: c[4m + q] holds pixels 4q..4q+4 of rows 4m..4m+4.
        let c: [__m128i; 16] = std::array::from_fn(|i| {
            let (m, q) = (i / 4, i % 4);
            let (lo, hi) = (b[4 * m + q / 2], b[4 * m + 2 + q / 2]);
            // SAFETY: as above.
            unsafe { if q % 2 == 1 { _mm_unpackhi_epi16(lo, hi) } else { _mm_unpacklo_epi16(lo, hi) } }
        });
        // 64-bit lanes of eight rows: d[8n + t] holds pixels 2t, 2t+1 of rows 8n..8n+8.
        let d: [__m128i; 16] = std::array::from_fn(|i| {
            let (n, t) = (i / 8, i % 8);
            let (lo, hi) = (c[8 * n + t / 2], c[8 * n + 4 + t / 2]);
            // SAFETY: as above.
            unsafe { if t % 2 == 1 { _mm_unpackhi_epi32(lo, hi) } else { _mm_unpacklo_epi32(lo, hi) } }
        });
        let mut out = [[0u8; 16]; 16];
        for (j, o) in out.iter_mut().enumerate() {
            let (t, hi) = (j / 2, j % 2 == 1);
            // SAFETY: the store writes the 16 bytes of one array.
            unsafe {
                let v = if hi { _mm_unpackhi_epi64(d[t], d[8 + t]) } else { _mm_unpacklo_epi64(d[t], d[8 + t]) };
                _mm_storeu_si128(o.as_mut_ptr().cast(), v);
            }
        }
        out
    }

    /// [`transpose4`] stored straight from the registers: column `j` into `out[at + j · pitch..][..4]`.
    ///
    /// # Panics
    /// When `out` is shorter than `at + 3 · pitch + 4`.
    #[inline(always)]
    pub(super) fn transpose4_into<T: Copy>(rows: &[&[T; 4]; 4], out: &mut [T], at: usize, pitch: usize) {
        const { assert!(std::mem::size_of::<T>() == 4) };
        assert!(out.len() >= at + 3 * pitch + 4, "the output is shorter than its last column");
        // SAFETY: each load reads the 16 bytes of one array (T is 4 bytes, asserted); each store
        // writes 16 bytes at `at + j · pitch`, in bounds (asserted); SSE2 is part of x86-64.
        unsafe {
            let a: [__m128i; 4] = std::array::from_fn(|i| _mm_loadu_si128(rows[i].as_ptr().cast()));
            let (t0, t1) = (_mm_unpacklo_epi32(a[0], a[1]), _mm_unpackhi_epi32(a[0], a[1]));
            let (t2, t3) = (_mm_unpacklo_epi32(a[2], a[3]), _mm_unpackhi_epi32(a[2], a[3]));
            let base = out.as_mut_ptr().add(at);
            _mm_storeu_si128(base.cast(), _mm_unpacklo_epi64(t0, t2));
            _mm_storeu_si128(base.add(pitch).cast(), _mm_unpackhi_epi64(t0, t2));
            _mm_storeu_si128(base.add(2 * pitch).cast(), _mm_unpacklo_epi64(t1, t3));
            _mm_storeu_si128(base.add(3 * pitch).cast(), _mm_unpackhi_epi64(t1, t3));
        }
    }

    /// A 4×4 matrix of 32-bit values (`i32` or `f32`) transposed: `out[j][i] = rows[i][j]`.
    pub(super) fn transpose4<T: Copy + Default>(rows: &[&[T; 4]; 4]) -> [[T; 4]; 4] {
        const { assert!(std::mem::size_of::<T>() == 4) };
        // SAFETY: each load reads the 16 bytes of one array (T is 4 bytes, asserted), each store
        // writes them back unchanged; SSE2 is part of x86-64.
        unsafe {
            let a: [__m128i; 4] = std::array::from_fn(|i| _mm_loadu_si128(rows[i].as_ptr().cast()));
            let (t0, t1) = (_mm_unpacklo_epi32(a[0], a[1]), _mm_unpackhi_epi32(a[0], a[1]));
            let (t2, t3) = (_mm_unpacklo_epi32(a[2], a[3]), _mm_unpackhi_epi32(a[2], a[3]));
            let v = [
                _mm_unpacklo_epi64(t0, t2),
                _mm_unpackhi_epi64(t0, t2),
                _mm_unpacklo_epi64(t1, t3),
                _mm_unpackhi_epi64(t1, t3),
            ];
            let mut out = [[T::default(); 4]; 4];
            for (o, v) in out.iter_mut().zip(v) {
                _mm_storeu_si128(o.as_mut_ptr().cast(), v);
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_sse2_transposes_transpose() {
        let rows: Vec<[u8; 16]> = (0..16).map(|i| std::array::from_fn(|j| (i * 16 + j) as u8)).collect();
        let refs: [&[u8; 16]; 16] = std::array::from_fn(|i| &rows[i]);
        let t = sse2::transpose16(&refs);
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(t[j][i], rows[i][j], "{i} {j}");
            }
        }
        let rows: Vec<[i32; 4]> = (0..4).map(|i| std::array::from_fn(|j| (i * 4 + j) as i32 - 7)).collect();
        let t = sse2::transpose4(&std::array::from_fn(|i| &rows[i]));
        for i in 0..4 {
            for j in 0..4 {
                assert_eq!(t[j][i], rows[i][j]);
            }
        }
    }

    /// Every channel count and length around the blocks, with and without room for whole
    /// blocks, on dense and row-structured maps, against the definitions.
    #[test]
    fn layout_changes_move_every_value_where_its_definition_says() {
        for channels in [1usize, 3, 4, 5, 15, 16, 17, 33] {
            for n in [1usize, 3, 4, 15, 16, 17, 40] {
                for room in [channels, channels.div_ceil(16) * 16] {
                    let stride = room + 3;
                    let width = [n, 3, 5][n % 3];
                    for map in [
                        PixelMap::dense(1, stride),
                        PixelMap {
                            width,
                            origin: 2 * stride + 1,
                            row_pitch: (width + 2) * stride,
                            pixel_pitch: stride,
                        },
                    ] {
                        let len = map.at(n - 1) + stride + 1;
                        let bytes: Vec<u8> = (0..channels * n).map(|i| (i * 7 + 3) as u8).collect();
                        let mut dst = vec![0u8; len];
                        planes_to_pixels(&bytes, channels, n, &mut dst, map, room);
                        let words: Vec<i32> = (0..channels * n).map(|i| i as i32 * 31 - 5).collect();
                        let mut dst32 = vec![0i32; len];
                        planes_to_pixels(&words, channels, n, &mut dst32, map, room);
                        let mut written = vec![false; len];
                        for p in 0..n {
                            for ch in 0..room {
                                written[map.at(p) + ch] = true;
                                if ch < channels {
                                    assert_eq!(dst[map.at(p) + ch], bytes[ch * n + p], "{channels} {n} {map:?}");
                                    assert_eq!(dst32[map.at(p) + ch], words[ch * n + p], "{channels} {n} {map:?}");
                                }
                            }
                        }
                        // Nothing written outside the pixels' room.
                        assert!((0..len).filter(|&i| !written[i]).all(|i| dst[i] == 0 && dst32[i] == 0));
                        if map.width == usize::MAX {
                            let mut back = vec![0i32; channels * n];
                            pixels_to_planes_32(&dst32[1..], n, stride, channels, &mut back);
                            assert_eq!(back, words, "{channels} {n}");
                        }
                    }
                }
            }
        }
    }
}
