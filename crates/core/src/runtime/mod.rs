//! The CPU runtime: [`freeze`] turns a [`Graph`](crate::Graph) into a [`Plan`] — batch norms folded into the
//! convolutions before them, ReLUs fused into their producers, weights laid out once, buffers
//! planned by liveness — and runs it on f32 kernels built on a GEMM.
//!
//! # Kernel interface
//! Every step of a plan is a [`Kernel`]. Which kernel implements a layer is decided by a
//! [`KernelRegistry`]: a list of builders, each offered a [`LayerView`] (the layer's op, its
//! f32 weights after folding, its shapes and whether a ReLU is fused) and free to decline. The
//! default f32 builders come last, so another crate — int8 kernels from shrink-quant, sparse
//! kernels from shrink-prune — plugs in by registering a builder, without shrink-core knowing
//! it:
//!
//! ```
//! use shrink_core::runtime::{FreezeOptions, Kernel, KernelRegistry, LayerView, RunContext, freeze_with};
//! use shrink_core::{BackendKind, zoo::ModelSpec};
//!
//! /// A (deliberately simple) linear kernel that another crate could provide.
//! #[derive(Debug)]
//! struct NaiveLinear { w: Vec<f32>, b: Vec<f32>, n_in: usize, n_out: usize }
//! impl Kernel for NaiveLinear {
//!     fn label(&self) -> String { "linear/naive".into() }
//!     fn run(&self, inputs: &[&[f32]], out: &mut [f32], batch: usize, _: &mut [f32], _: &RunContext<'_>) {
//!         for i in 0..batch {
//!             for o in 0..self.n_out {
//!                 let x = &inputs[0][i * self.n_in..(i + 1) * self.n_in];
//!                 let w = &self.w[o * self.n_in..(o + 1) * self.n_in];
//!                 out[i * self.n_out + o] = self.b[o] + x.iter().zip(w).map(|(a, b)| a * b).sum::<f32>();
//!             }
//!         }
//!     }
//! }
//!
//! let mut registry = KernelRegistry::default();
//! registry.register("naive-linear", |view: &LayerView<'_>| {
//!     (view.op.kind() == "linear" && !view.relu).then(|| Box::new(NaiveLinear {
//!         w: view.weight.to_vec(),
//!         b: view.bias.map(|b| b.to_vec()).unwrap_or_else(|| vec![0.0; view.weight_shape[0]]),
//!         n_in: view.weight_shape[1],
//!         n_out: view.weight_shape[0],
//!     }) as Box<dyn Kernel>)
//! });
//! let device = BackendKind::Flex.device().unwrap();
//! let graph = ModelSpec::Mlp { hidden: vec![16] }.build([1, 4, 4], 3, 42, &device).unwrap();
//! let plan = freeze_with(&graph, &registry, &FreezeOptions::default()).unwrap();
//! assert!(plan.kernels().iter().any(|(_, label)| label == "linear/naive"));
//! ```

mod freeze;
mod fusion;
mod kernels;

pub use freeze::{freeze, freeze_with};
pub use fusion::batch_norm_after;
pub use kernels::{
    Activated, ConvDirect, ConvF32, ConvGeometry, ConvRten, LinearF32, LinearRten, PoolKind, Simple, Unary,
    blocked_handover,
};
pub use shrink_kernels::sgemm::sgemm;

use std::fmt::Debug;

use crate::graph::{Op, ValueShape};
use crate::kernels::team::Team;
use crate::{Error, Result};

/// f32 storage aligned to 64 bytes (a cache line, an AVX-512 register): the GEMM reads
/// unpacked operands straight from memory, and misaligned rows were measured to halve its speed.
pub type Aligned = aligned_vec::AVec<f32, aligned_vec::ConstAlign<64>>;

/// A 64-byte-aligned copy of `values`.
pub fn aligned(values: &[f32]) -> Aligned {
    Aligned::from_slice(64, values)
}

/// What a kernel builder sees of a layer.
#[derive(Clone, Copy, Debug)]
pub struct LayerView<'a> {
    /// Node name.
    pub name: &'a str,
    /// The op (channel counts, kernel size, stride, …).
    pub op: &'a Op,
    /// f32 weights in the graph's layout (`[out, in/groups, kh, kw]` or `[out, in]`), with any
    /// batch norm already folded in.
    pub weight: &'a [f32],
    /// Shape of `weight`.
    pub weight_shape: &'a [usize],
    /// Bias (after folding), if any.
    pub bias: Option<&'a [f32]>,
    /// Input shape, batch excluded.
    pub input: ValueShape,
    /// Output shape, batch excluded.
    pub output: ValueShape,
    /// Whether a ReLU on the output is fused into this layer (after the residual, if any).
    pub relu: bool,
    /// A clip or hard-swish after the layer fused into it (never with a ReLU), applied last. A
    /// kernel that applies it says so ([`Kernel::applies_activation`]); after any other the
    /// plan applies it to the kernel's output in a pass of its own ([`Activated`]),
    /// the same bits either way. Only registries made with [`KernelRegistry::fusing_epilogues`]
    /// (and the plan's own kernels) are offered it: in any other registry it is `None`.
    pub activation: Option<crate::kernels::activation::Activation>,
    /// Whether a residual add is fused into this convolution: the kernel adds its second input
    /// (an image of the output's shape) after the bias, before the ReLU. Only registries made
    /// with [`KernelRegistry::fusing_epilogues`] (and the plan's own kernels) are offered it: in
    /// any other registry a builder always sees `false`.
    pub residual: bool,
    /// The layer that alone reads this layer's output (its value after the absorbed batch norm
    /// and ReLU), when nothing else reads that value and it is not the graph's output. The plan
    /// decides this once, by its fusion rules; a builder may use it to hand the value over in
    /// its own format (shrink-quant's integer convolutions pass u8 to the next one).
    pub read_by: Option<LayerLink<'a>>,
    /// The layer whose output only this layer reads: the other side of
    /// [`LayerView::read_by`].
    pub reads_from: Option<LayerLink<'a>>,
}

/// A conv or linear layer next to the one a builder is offered (see [`LayerView::read_by`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerLink<'a> {
    /// Node name.
    pub name: &'a str,
    /// The op.
    pub op: &'a Op,
    /// Its input shape, batch excluded.
    pub input: ValueShape,
    /// Its output shape, batch excluded.
    pub output: ValueShape,
    /// Shape of the value the two layers share (the first one's output after its absorbed
    /// nodes): the plan's buffer for it holds this many f32 per image.
    pub value: ValueShape,
    /// The activation fused into this layer ([`LayerView::activation`]).
    pub activation: Option<crate::kernels::activation::Activation>,
}

/// What a kernel may use while it runs, passed to every kernel.
#[derive(Debug, Clone, Copy)]
pub struct RunContext<'a> {
    /// The threads one call may split a layer of one image between
    /// ([`Team::for_each_chunk`](crate::kernels::team::Team::for_each_chunk)): a one-thread
    /// team inside a plan's workers, which already split the batch between them; several only
    /// for a single image on a multi-threaded plan.
    pub team: &'a Team,
    /// The rayon pool of `team.size()` threads that a GEMM spreads over (the GEMM crates
    /// split over the current rayon pool), or `None` where GEMMs run on the calling thread.
    pub gemm_pool: Option<&'a rayon::ThreadPool>,
}

/// The one-thread team of [`RunContext::sequential`].
static ONE_THREAD: Team = Team::sequential();

impl RunContext<'static> {
    /// Everything on the calling thread.
    pub fn sequential() -> Self {
        Self { team: &ONE_THREAD, gemm_pool: None }
    }
}

impl RunContext<'_> {
    /// Runs `f(gemm_threads)` where GEMMs may spread over the team's threads: in
    /// [`Self::gemm_pool`] with its thread count, or on the calling thread with 1.
    pub fn with_gemm_threads<R: Send>(&self, f: impl FnOnce(usize) -> R + Send) -> R {
        match self.gemm_pool {
            Some(pool) if self.team.size() > 1 => pool.install(|| f(self.team.threads())),
            _ => f(1),
        }
    }

    /// Runs `f(image, output, scratch, gemm_threads)` for every image of a batch, one after the
    /// other, reusing `scratch` (which must hold `scratch_len` values).
    pub fn for_each_image<F>(
        &self,
        batch: usize,
        output: &mut [f32],
        out_len: usize,
        scratch: &mut [f32],
        scratch_len: usize,
        f: F,
    ) where
        F: Fn(usize, &mut [f32], &mut [f32], usize) + Send,
    {
        self.with_gemm_threads(move |threads| {
            for (i, out) in output.chunks_exact_mut(out_len).enumerate().take(batch) {
                f(i, out, &mut scratch[..scratch_len], threads);
            }
        });
    }
}

/// One step of a plan: computes a value from earlier values.
pub trait Kernel: Send + Sync + Debug {
    /// What implements the step, for reports: e.g. `conv2d/f32-im2col-gemm+relu`.
    fn label(&self) -> String;

    /// Scratch values needed per image (e.g. an im2col buffer).
    fn scratch_per_image(&self) -> usize {
        0
    }

    /// Values per image it writes when that is more than its value's shape holds: a layout it
    /// hands to the one layer that reads it ([`LayerView::read_by`]), such as a zero-padded
    /// image. The plan sizes the value's buffers for it.
    fn output_len_per_image(&self) -> Option<usize> {
        None
    }

    /// Whether it applies the activation of its [`LayerView::activation`] itself (else the
    /// plan applies it after the kernel). `false` unless a kernel says otherwise.
    fn applies_activation(&self) -> bool {
        false
    }

    /// Computes `output` (`batch` images) from `inputs` (`batch` images each), contiguous,
    /// channel-major.
    fn run(&self, inputs: &[&[f32]], output: &mut [f32], batch: usize, scratch: &mut [f32], ctx: &RunContext<'_>);
}

/// A function that may provide a kernel for a layer.
pub type KernelBuilder = Box<dyn Fn(&LayerView<'_>) -> Option<Box<dyn Kernel>> + Send + Sync>;

/// Kernel builders, tried in order; the f32 defaults come after every registered one.
#[derive(Default)]
pub struct KernelRegistry {
    builders: Vec<(String, KernelBuilder)>,
    /// Whether its builders take fused residual adds and activations
    /// ([`KernelRegistry::fusing_epilogues`]).
    epilogues: bool,
}

impl std::fmt::Debug for KernelRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.builders.iter().map(|(n, _)| n)).finish()
    }
}

impl KernelRegistry {
    /// Adds a builder, tried before the ones registered earlier and before the defaults.
    pub fn register(
        &mut self,
        name: impl Into<String>,
        builder: impl Fn(&LayerView<'_>) -> Option<Box<dyn Kernel>> + Send + Sync + 'static,
    ) {
        self.builders.insert(0, (name.into(), Box::new(builder)));
    }

    /// A registry whose convolutions and linear layers run on the `gemm` crate (faer's GEMM,
    /// burn-flex's matmul) with a materialised im2col: the alternative the default rten-gemm
    /// kernels are measured against (`cargo xtask bench runtime`). It cannot pre-pack weights
    /// and allocates its packing buffers inside every GEMM call.
    pub fn gemm_crate() -> Self {
        let mut r = Self::default();
        r.register("f32/gemm-crate", |view: &LayerView<'_>| match view.op {
            Op::Conv2d { .. } => Some(Box::new(ConvF32::new(view)) as Box<dyn Kernel>),
            Op::Linear { .. } => Some(Box::new(LinearF32::new(view)) as Box<dyn Kernel>),
            _ => None,
        });
        r
    }

    /// An empty registry whose builders promise to take fused residual adds: every
    /// convolution a builder accepts while [`LayerView::residual`] is set adds the step's second
    /// input after its bias (a builder that cannot declines the layer, which then runs on the
    /// plan's own kernels). The plan then fuses residual adds into convolutions, and clips and
    /// hard-swishes into the layers before them ([`LayerView::activation`]), as it does with no
    /// builders; other registries never see either.
    pub fn fusing_epilogues() -> Self {
        Self { builders: Vec::new(), epilogues: true }
    }

    /// Whether the registry has no builders: the plan's own kernels only, which take fused
    /// residual adds.
    pub fn is_default(&self) -> bool {
        self.builders.is_empty()
    }

    /// Whether the plan fuses residual adds into convolutions and activations into layers: with
    /// no builders, or builders that take them ([`Self::fusing_epilogues`]).
    pub fn fuses_epilogues(&self) -> bool {
        self.is_default() || self.epilogues
    }

    /// A registry whose convolutions run on rten-gemm over an im2col matrix (the default before
    /// the direct kernel, and still the default's fallback): what `cargo xtask bench
    /// onnxruntime` measures the direct convolution against.
    pub fn im2col_gemm() -> Self {
        let mut r = Self::default();
        r.register("f32/im2col-rten-gemm", |view: &LayerView<'_>| match view.op {
            Op::Conv2d { .. } => ConvRten::new(view).map(|k| Box::new(k) as Box<dyn Kernel>),
            _ => None,
        });
        r
    }

    /// The kernel of a layer, with its fused activation applied after it where the kernel does
    /// not apply it itself.
    fn build(&self, view: &LayerView<'_>) -> Box<dyn Kernel> {
        let kernel = self.build_layer(view);
        match view.activation {
            Some(activation) if !kernel.applies_activation() => {
                Box::new(kernels::Activated::new(kernel, activation, view.output.numel()))
            }
            _ => kernel,
        }
    }

    fn build_layer(&self, view: &LayerView<'_>) -> Box<dyn Kernel> {
        for (name, builder) in &self.builders {
            if let Some(k) = builder(view) {
                tracing::debug!(layer = view.name, builder = %name, "custom kernel");
                return k;
            }
        }
        match view.op {
            Op::Conv2d { .. } => {
                // Blocked hand-overs between the plan's own convolutions only: a registered
                // builder could take the other layer of a pair.
                if let Some(k) = ConvDirect::new(view, self.builders.is_empty()) {
                    return Box::new(k);
                }
                match ConvRten::new(view) {
                    Some(k) => Box::new(k),
                    None => Box::new(ConvF32::new(view)),
                }
            }
            Op::Linear { .. } => Box::new(LinearRten::new(view)),
            op => unreachable!("layer views are only made for conv2d and linear, not {}", op.kind()),
        }
    }
}

/// Options of [`freeze_with`].
#[derive(Clone, Debug)]
pub struct FreezeOptions {
    /// Threads the plan may use; 1 by default.
    pub threads: usize,
}

impl Default for FreezeOptions {
    fn default() -> Self {
        Self { threads: 1 }
    }
}

/// Bytes of buffers per executor that a batch is run in chunks to fit (see [`Plan::run`]):
/// about a core's L2 cache (1 MiB on AMD Zen 4, 2 MiB on Intel Sapphire Rapids). Measured on
/// ResNet-20 (MNIST-sized, one thread, AMD EPYC Zen 4): the integer plan at batch 64 runs
/// about 6 % faster in chunks of 4 to 32 images than in one pass (its layers are fast enough
/// for memory to matter); the f32 plan is the same either way.
pub const CACHE_BUDGET: usize = 1 << 20;

/// Most inputs one step may have (adds of more branches are refused at freeze time).
pub const MAX_INPUTS: usize = 8;

struct Step {
    node: String,
    kernel: Box<dyn Kernel>,
    inputs: Vec<usize>,
    output: usize,
    /// Multiply-adds per image (conv and linear layers; 0 for the rest): whether a single image's
    /// step is worth splitting between threads ([`SPLIT_MIN_MACS`]).
    macs: u64,
}

/// The fewest multiply-adds per image for which a single image's layer is split between a
/// plan's threads; smaller steps run on the calling thread, the helpers staying idle. Handing a
/// layer to the team costs a few microseconds of synchronisation, more than splitting saves on
/// a layer that takes a few tens of microseconds alone: the imported MobileNet's layers
/// (≤ 0.15 M multiply-adds) ran 2× slower at two threads than at one, and run as fast as at one
/// since. ResNet-20's (2.4 M each) are still split; at batch 1 two threads run at 0.97–1.05×
/// one thread's speed there (`cargo xtask bench onnxruntime`, `b1 threads` rows): the speed-up
/// issue #21 asks for is not reached yet.
pub const SPLIT_MIN_MACS: u64 = 1 << 20;

/// A frozen graph, ready to run on the CPU.
pub struct Plan {
    steps: Vec<Step>,
    /// Per value: elements per image.
    value_len: Vec<usize>,
    /// Per value: its buffer slot.
    slot_of: Vec<usize>,
    /// Per slot: elements per image it must hold.
    slot_len: Vec<usize>,
    input_shape: [usize; 3],
    output_value: usize,
    /// Buffers for a batch run on the calling thread (one thread, or one image).
    main: Workspace,
    /// One workspace per worker thread: with several threads a batch is split into chunks of
    /// images and each worker runs the whole plan on the chunks it takes, so threads meet once
    /// per forward pass instead of once per layer (on a busy machine a descheduled thread would
    /// otherwise hold up every layer).
    workers: Vec<Workspace>,
    /// Where the workers put their outputs.
    output: Aligned,
    /// With several threads: a pool in which the GEMMs of a single image spread over all threads.
    outer: Option<rayon::ThreadPool>,
    /// The threads a single image's layers are split between (helpers that spin between
    /// layers: a rayon pool's sleeping workers cost as much to wake as the split saved).
    team: Team,
    /// One single-thread pool per worker. rten-gemm spreads a GEMM over whatever rayon pool it
    /// is called in; inside these it runs sequentially, so a worker never waits on another in
    /// the middle of a layer, and a one-thread plan really uses one thread. Waiting for a
    /// worker blocks on a condition variable (no spinning).
    single: Vec<rayon::ThreadPool>,
}

fn thread_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::RunFailed(format!("cannot start {threads} threads: {e}")))
}

/// The buffers one executor of a plan cycles through.
struct Workspace {
    buffers: Vec<Aligned>,
    scratch: Aligned,
    capacity: usize,
}

impl Workspace {
    fn new(slots: usize) -> Self {
        Self { buffers: (0..slots).map(|_| Aligned::new(64)).collect(), scratch: Aligned::new(64), capacity: 0 }
    }
}

/// The fixed part of a plan that every executor reads.
struct Program<'a> {
    steps: &'a [Step],
    value_len: &'a [usize],
    slot_of: &'a [usize],
    slot_len: &'a [usize],
    output_value: usize,
}

impl Program<'_> {
    /// Runs `batch` images through the steps in `ws`; buffers grow only when `batch` exceeds
    /// what `ws` held before.
    /// With `times`, each step's wall time is written there.
    fn execute<'w>(
        &self,
        ws: &'w mut Workspace,
        input: &[f32],
        batch: usize,
        ctx: &RunContext<'_>,
        mut times: Option<&mut [std::time::Duration]>,
    ) -> &'w [f32] {
        if batch > ws.capacity {
            for (buf, len) in ws.buffers.iter_mut().zip(self.slot_len) {
                buf.resize(len * batch, 0.0);
            }
            let scratch = self.steps.iter().map(|s| s.kernel.scratch_per_image()).max().unwrap_or(0);
            ws.scratch.resize(scratch, 0.0);
            ws.capacity = batch;
        }
        ws.buffers[self.slot_of[0]][..input.len()].copy_from_slice(input);
        for (n, step) in self.steps.iter().enumerate() {
            let start = times.is_some().then(std::time::Instant::now);
            let out_slot = self.slot_of[step.output];
            let out_len = self.value_len[step.output] * batch;
            // The output slot is never one of the step's input slots (planned so), so it can be
            // taken out while the inputs are borrowed.
            let mut out = std::mem::replace(&mut ws.buffers[out_slot], Aligned::new(64));
            {
                // A fixed array, not a Vec: a forward pass must not allocate.
                let mut inputs: [&[f32]; MAX_INPUTS] = [&[]; MAX_INPUTS];
                for (slot, &v) in inputs.iter_mut().zip(&step.inputs) {
                    *slot = &ws.buffers[self.slot_of[v]][..self.value_len[v] * batch];
                }
                let inputs = &inputs[..step.inputs.len()];
                let sequential = RunContext::sequential();
                let ctx = if ctx.team.size() > 1 && step.macs < SPLIT_MIN_MACS { &sequential } else { ctx };
                step.kernel.run(inputs, &mut out[..out_len], batch, &mut ws.scratch, ctx);
            }
            ws.buffers[out_slot] = out;
            if let (Some(times), Some(start)) = (times.as_deref_mut(), start) {
                times[n] = start.elapsed();
            }
        }
        let len = self.value_len[self.output_value] * batch;
        &ws.buffers[self.slot_of[self.output_value]][..len]
    }

    /// Runs `batch` images on the calling thread, `chunk` at a time (all at once when they are
    /// no more), the outputs gathered in `output` when there are several chunks.
    fn execute_in_chunks<'w>(
        &self,
        ws: &'w mut Workspace,
        output: &'w mut Aligned,
        input: &[f32],
        batch: usize,
        chunk: usize,
    ) -> &'w [f32] {
        let sequential = RunContext::sequential();
        if batch <= chunk {
            return self.execute(ws, input, batch, &sequential, None);
        }
        let (per, out_per) = (input.len() / batch, self.value_len[self.output_value]);
        if output.len() < batch * out_per {
            output.resize(batch * out_per, 0.0);
        }
        for (out, images) in output[..batch * out_per].chunks_mut(chunk * out_per).zip(input.chunks(chunk * per)) {
            out.copy_from_slice(self.execute(ws, images, images.len() / per, &sequential, None));
        }
        &output[..batch * out_per]
    }
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan").field("steps", &self.kernels()).field("slots", &self.slot_len.len()).finish()
    }
}

/// Runs `work` once on each of `pools` (single-thread pools), each with its own workspace, and
/// returns when all have finished.
fn dispatch(pools: &[rayon::ThreadPool], workspaces: &mut [Workspace], work: &(dyn Fn(&mut Workspace) + Sync)) {
    match (pools, workspaces) {
        ([], _) | (_, []) => {}
        ([pool], [ws, ..]) => pool.install(|| work(ws)),
        ([pool, rest @ ..], [ws, other @ ..]) => pool.in_place_scope(|scope| {
            scope.spawn(|_| work(ws));
            dispatch(rest, other, work);
        }),
    }
}

impl Plan {
    /// Each step's node and kernel label, in order.
    pub fn kernels(&self) -> Vec<(String, String)> {
        self.steps.iter().map(|s| (s.node.clone(), s.kernel.label())).collect()
    }

    /// Threads the plan uses.
    pub fn threads(&self) -> usize {
        self.team.size()
    }

    /// Number of buffers the plan cycles through (fewer than values: slots are reused).
    pub fn buffer_count(&self) -> usize {
        self.slot_len.len()
    }

    /// Elements per image of the output.
    pub fn output_len(&self) -> usize {
        self.value_len[self.output_value]
    }

    /// Runs a batch on the calling thread, step by step, and returns each step's node, kernel
    /// label and wall time: where a forward pass spends its time. The whole batch goes through
    /// each step at once (not in [`Self::run`]'s cache-sized chunks), so each time covers every
    /// image.
    ///
    /// # Errors
    /// As [`Plan::run`].
    pub fn profile(&mut self, input: &[f32], batch: usize) -> Result<Vec<(String, String, std::time::Duration)>> {
        self.check_input(input, batch)?;
        let program = Program {
            steps: &self.steps,
            value_len: &self.value_len,
            slot_of: &self.slot_of,
            slot_len: &self.slot_len,
            output_value: self.output_value,
        };
        let mut times = vec![std::time::Duration::ZERO; self.steps.len()];
        let main = &mut self.main;
        // On one thread, as a one-thread plan runs.
        self.single[0].install(|| program.execute(main, input, batch, &RunContext::sequential(), Some(&mut times)));
        Ok(self.steps.iter().zip(times).map(|(s, t)| (s.node.clone(), s.kernel.label(), t)).collect())
    }

    fn check_input(&self, input: &[f32], batch: usize) -> Result<()> {
        let per = self.input_shape.iter().product::<usize>();
        if batch == 0 || input.len() != batch * per {
            let mut got = vec![batch];
            got.push(input.len() / batch.max(1));
            return Err(Error::InputShape { got, expected: self.input_shape });
        }
        Ok(())
    }

    /// Images whose buffers (every slot and the scratch, per image) fit in [`CACHE_BUDGET`]:
    /// how many one executor runs through the whole plan at a time (at least 1).
    pub fn images_per_pass(&self) -> usize {
        let scratch = self.steps.iter().map(|s| s.kernel.scratch_per_image()).max().unwrap_or(0);
        let bytes = (self.slot_len.iter().sum::<usize>() + scratch) * std::mem::size_of::<f32>();
        (CACHE_BUDGET / bytes.max(1)).max(1)
    }

    /// Runs a batch of `[batch, c, h, w]` images (contiguous f32) and returns the outputs,
    /// `[batch, outputs]`. A large batch runs through the plan a few images at a time
    /// ([`Self::images_per_pass`]: as many as keep their buffers in [`CACHE_BUDGET`]), so each
    /// layer's output is still in the core's cache when the next layer reads it; with several
    /// threads each worker takes such chunks. Buffers grow on the first call with a larger batch and are reused after that: a
    /// call at the same or a smaller batch size allocates nothing.
    ///
    /// # Errors
    /// [`Error::InputShape`] when `input` does not hold `batch` images of the graph's shape.
    pub fn run(&mut self, input: &[f32], batch: usize) -> Result<&[f32]> {
        self.check_input(input, batch)?;
        let per = self.input_shape.iter().product::<usize>();
        let cached = self.images_per_pass();
        let program = Program {
            steps: &self.steps,
            value_len: &self.value_len,
            slot_of: &self.slot_of,
            slot_len: &self.slot_len,
            output_value: self.output_value,
        };
        let out_per = self.value_len[self.output_value];
        match &self.outer {
            Some(_) if batch > 1 => {
                // At least two chunks per thread, taken by whichever worker is free, so a thread
                // that the OS deschedules on a busy machine simply takes fewer.
                let chunk = batch.div_ceil(2 * self.team.size()).min(cached).max(1);
                if self.output.len() < batch * out_per {
                    self.output.resize(batch * out_per, 0.0);
                }
                let chunks = std::sync::Mutex::new(
                    self.output[..batch * out_per].chunks_mut(chunk * out_per).zip(input.chunks(chunk * per)),
                );
                let work = |ws: &mut Workspace| {
                    let sequential = RunContext::sequential();
                    loop {
                        let next = chunks.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).next();
                        let Some((out, images)) = next else { break };
                        out.copy_from_slice(program.execute(ws, images, images.len() / per, &sequential, None));
                    }
                };
                dispatch(&self.single, &mut self.workers, &work);
                Ok(&self.output[..batch * out_per])
            }
            // One image: each layer split between the team's threads, from this thread.
            Some(pool) => {
                let ctx = RunContext { team: &self.team, gemm_pool: Some(pool) };
                Ok(program.execute(&mut self.main, input, batch, &ctx, None))
            }
            // Already on a single thread (e.g. rayon's global pool has one): no hand-over needed.
            None if rayon::current_num_threads() == 1 => {
                Ok(program.execute_in_chunks(&mut self.main, &mut self.output, input, batch, cached))
            }
            None => {
                let (main, output) = (&mut self.main, &mut self.output);
                Ok(self.single[0].install(|| program.execute_in_chunks(main, output, input, batch, cached)))
            }
        }
    }
}
