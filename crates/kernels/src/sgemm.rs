//! A safe wrapper around the `gemm` crate (faer's GEMM, already the matmul of burn's flex
//! backend), for row-major f32 matrices.
//!
//! `gemm::gemm` takes raw pointers and strides. The wrapper checks every slice length against
//! the shapes first, so the call cannot read or write out of bounds.
#![allow(unsafe_code)]

/// `c = a × b` (or `c += a × b` when `accumulate`), row-major: `a` is `m × k` with row stride
/// `lda`, `b` is `k × n` with row stride `ldb`, `c` is `m × n` with row stride `ldc`.
///
/// `threads > 1` lets the GEMM split its work over that many rayon threads.
///
/// # Panics
/// If a slice is too short for its shape and stride (a bug in the caller, never user input).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(lda >= k && ldb >= n && ldc >= n, "strides shorter than rows");
    assert!(k == 0 || a.len() >= (m - 1) * lda + k, "lhs slice too short");
    assert!(k == 0 || b.len() >= (k - 1) * ldb + n, "rhs slice too short");
    assert!(c.len() >= (m - 1) * ldc + n, "dst slice too short");
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the asserts above guarantee that every element addressed through the given shapes
    // and strides lies inside the slices; `c` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            1,
            lda as isize,
            b.as_ptr(),
            1,
            ldb as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_product() {
        let (m, n, k) = (7, 5, 9);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.5).collect();
        let mut c = vec![1.0; m * n];
        sgemm(m, n, k, &a, k, &b, n, &mut c, n, true, 1);
        for i in 0..m {
            for j in 0..n {
                let expect: f32 = 1.0 + (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum::<f32>();
                assert!((c[i * n + j] - expect).abs() < 1e-4);
            }
        }
    }
}
