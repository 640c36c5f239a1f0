//! Sparse execution in the CPU plan: convolutions and linear layers whose pruned weights are
//! sparse enough ([`SPARSE_MAX_DENSITY`]) run on the CSR kernels of
//! [`shrink_core::kernels::sparse`], so the work scales with the non-zeros. Stride-1
//! convolutions skip the im2col matrix and read the padded input directly (see [`ConvSparse`]).

use shrink_core::graph::Op;
use shrink_core::kernels::sparse::{CONV_ROWS, conv_direct};
pub use shrink_core::kernels::sparse::{Csr, SPARSE_MAX_DENSITY, spmm};
use shrink_core::runtime::{ConvGeometry, Kernel, KernelRegistry, LayerView, RunContext};

/// `n` rounded up to whole narrow tiles: buffers padded so, with their extra columns ignored,
/// run on fixed-width tiles only.
fn padded(n: usize) -> usize {
    n.div_ceil(16) * 16
}

fn epilogue(row: &mut [f32], bias: f32, relu: bool) {
    if relu {
        row.iter_mut().for_each(|v| *v = (*v + bias).max(0.0));
    } else {
        row.iter_mut().for_each(|v| *v += bias);
    }
}

thread_local! {
    /// Per-thread work buffers (im2col columns, transposed inputs, outputs) reused across calls.
    static BUFFERS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Columns of the im2col matrix worth filling before one SpMM: small feature maps of several
/// images share a call, so the 128-wide tiles are full.
const COLUMNS: usize = 512;

/// A convolution (groups = 1) on CSR weights. Stride-1, undilated convolutions run directly on
/// the zero-padded input: a filter's non-zero `(c, ky, kx)` reads the input plane `c` shifted by
/// `(ky, kx)`, a contiguous row segment per output row, so no im2col matrix (nine times the
/// input, for 3×3) is written or read. Other convolutions unroll the input (im2col) and call
/// [`spmm`].
#[derive(Debug)]
pub struct ConvSparse {
    weight: Csr,
    bias: Vec<f32>,
    relu: bool,
    geometry: ConvGeometry,
    /// Direct path: each entry's offset in the padded input, `c·hp·wp + ky·wp + kx`.
    offsets: Option<Vec<u32>>,
}

impl ConvSparse {
    /// The sparse kernel of a convolution view, or `None` for grouped convolutions.
    pub fn new(view: &LayerView<'_>) -> Option<Self> {
        let Op::Conv2d { groups: 1, out_channels, .. } = *view.op else { return None };
        let geometry = ConvGeometry::of(view)?;
        let k = view.weight.len() / out_channels;
        let weight = Csr::from_dense(view.weight, out_channels, k);
        let direct = geometry.stride == [1, 1] && geometry.dilation == [1, 1];
        let offsets = direct.then(|| {
            let (_, hp, wp) = padded_dims(&geometry);
            let [kh, kw] = geometry.kernel;
            weight
                .col
                .iter()
                .map(|&k| {
                    let (c, ky, kx) = (k as usize / (kh * kw), k as usize / kw % kh, k as usize % kw);
                    (c * hp * wp + ky * wp + kx) as u32
                })
                .collect()
        });
        Some(Self {
            weight,
            bias: view.bias.map(|b| b.to_vec()).unwrap_or_else(|| vec![0.0; out_channels]),
            relu: view.relu,
            geometry,
            offsets,
        })
    }

    /// One image by the direct path: pad it into `x`, accumulate into `out`.
    fn direct(&self, offsets: &[u32], image: &[f32], x: &mut Vec<f32>, out: &mut [f32]) {
        let (c, h, w) = self.geometry.input;
        let (_, oh, ow) = self.geometry.output;
        let (_, hp, wp) = padded_dims(&self.geometry);
        let [ph, pw] = self.geometry.padding;
        // Slack past the planes: edge tiles read whole tiles (their extra lanes are dropped).
        x.clear();
        x.resize(c * hp * wp + (CONV_ROWS + 1) * wp + 16, 0.0);
        for ch in 0..c {
            for y in 0..h {
                let dst = (ch * hp + y + ph) * wp + pw;
                x[dst..dst + w].copy_from_slice(&image[(ch * h + y) * w..][..w]);
            }
        }
        conv_direct(&self.weight, offsets, x, wp, oh, ow, out);
        let n = oh * ow;
        for (ch, row) in out.chunks_exact_mut(n).enumerate() {
            epilogue(row, self.bias[ch], self.relu);
        }
    }
}

/// `(channels, height, width)` of a convolution's zero-padded input.
fn padded_dims(g: &ConvGeometry) -> (usize, usize, usize) {
    let (c, h, w) = g.input;
    (c, h + 2 * g.padding[0], w + 2 * g.padding[1])
}

impl Kernel for ConvSparse {
    fn label(&self) -> String {
        format!(
            "conv2d/f32-{}-spmm-csr ({:.0} % non-zero){}",
            if self.offsets.is_some() { "direct" } else { "im2col" },
            self.weight.density() * 100.0,
            if self.relu { "+relu" } else { "" }
        )
    }

    fn run(&self, inputs: &[&[f32]], output: &mut [f32], batch: usize, _scratch: &mut [f32], _ctx: &RunContext<'_>) {
        let (cin, h, w) = self.geometry.input;
        let (cout, oh, ow) = self.geometry.output;
        let (n, k) = (oh * ow, self.weight.cols);
        let (in_len, out_len) = (cin * h * w, cout * n);
        if let Some(offsets) = &self.offsets {
            BUFFERS.with(|buffers| {
                let (x, _) = &mut *buffers.borrow_mut();
                for i in 0..batch {
                    let image = &inputs[0][i * in_len..(i + 1) * in_len];
                    self.direct(offsets, image, x, &mut output[i * out_len..(i + 1) * out_len]);
                }
            });
            return;
        }
        let group = (COLUMNS / n.max(1)).clamp(1, batch.max(1));
        BUFFERS.with(|buffers| {
            let (col, acc) = &mut *buffers.borrow_mut();
            col.resize(k * padded(group * n), 0.0);
            acc.resize(cout * padded(group * n), 0.0);
            let mut first = 0;
            while first < batch {
                let g = group.min(batch - first);
                let ld = padded(g * n);
                for i in 0..g {
                    let image = &inputs[0][(first + i) * in_len..(first + i + 1) * in_len];
                    self.geometry.im2col(image, 0, cin, &mut col[i * n..], ld);
                }
                spmm(&self.weight, col, ld, ld, acc, ld);
                for i in 0..g {
                    let out = &mut output[(first + i) * out_len..(first + i + 1) * out_len];
                    for (c, row) in out.chunks_exact_mut(n).enumerate() {
                        row.copy_from_slice(&acc[c * ld + i * n..][..n]);
                        epilogue(row, self.bias[c], self.relu);
                    }
                }
                first += g;
            }
        });
    }
}

/// A linear layer on CSR weights: the batch transposed to `[in, batch]`, then [`spmm`].
#[derive(Debug)]
pub struct LinearSparse {
    weight: Csr,
    bias: Vec<f32>,
    relu: bool,
}

impl LinearSparse {
    /// The sparse kernel of a linear view.
    pub fn new(view: &LayerView<'_>) -> Option<Self> {
        let Op::Linear { in_features, out_features, .. } = *view.op else { return None };
        Some(Self {
            weight: Csr::from_dense(view.weight, out_features, in_features),
            bias: view.bias.map(|b| b.to_vec()).unwrap_or_else(|| vec![0.0; out_features]),
            relu: view.relu,
        })
    }
}

impl Kernel for LinearSparse {
    fn label(&self) -> String {
        format!(
            "linear/f32-spmm-csr ({:.0} % non-zero){}",
            self.weight.density() * 100.0,
            if self.relu { "+relu" } else { "" }
        )
    }

    fn run(&self, inputs: &[&[f32]], output: &mut [f32], batch: usize, _scratch: &mut [f32], _ctx: &RunContext<'_>) {
        let (k, o) = (self.weight.cols, self.weight.rows);
        // One image: a sparse matrix-vector product; more: the batch as padded columns.
        let ld = if batch == 1 { 1 } else { padded(batch) };
        BUFFERS.with(|buffers| {
            let (xt, acc) = &mut *buffers.borrow_mut();
            xt.resize(k * ld, 0.0);
            acc.resize(o * ld, 0.0);
            for (b, x) in inputs[0].chunks_exact(k).take(batch).enumerate() {
                for (i, &v) in x.iter().enumerate() {
                    xt[i * ld + b] = v;
                }
            }
            spmm(&self.weight, xt, ld, ld, acc, ld);
            for (b, y) in output.chunks_exact_mut(o).take(batch).enumerate() {
                for (j, v) in y.iter_mut().enumerate() {
                    let x = acc[j * ld + b] + self.bias[j];
                    *v = if self.relu { x.max(0.0) } else { x };
                }
            }
        });
    }
}

/// Adds builders that run every conv (groups = 1) and linear layer whose weights are at most
/// `max_density` non-zero on the sparse kernels; denser layers keep the dense defaults.
pub fn register_sparse_kernels(registry: &mut KernelRegistry, max_density: f64) {
    registry.register("f32/sparse-csr", move |view: &LayerView<'_>| {
        let density = view.weight.iter().filter(|v| **v != 0.0).count() as f64 / view.weight.len().max(1) as f64;
        if density > max_density {
            return None;
        }
        match view.op {
            Op::Conv2d { .. } => ConvSparse::new(view).map(|k| Box::new(k) as Box<dyn Kernel>),
            Op::Linear { .. } => LinearSparse::new(view).map(|k| Box::new(k) as Box<dyn Kernel>),
            _ => None,
        }
    });
}

/// A registry whose sparse-enough layers run on the sparse kernels (threshold
/// [`SPARSE_MAX_DENSITY`]).
pub fn sparse_registry() -> KernelRegistry {
    let mut r = KernelRegistry::default();
    register_sparse_kernels(&mut r, SPARSE_MAX_DENSITY);
    r
}
