//! Allocation behaviour of a frozen plan's forward pass, checked with a counting global
//! allocator (single-threaded).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use shrink_core::BackendKind;
use shrink_core::runtime::{FreezeOptions, KernelRegistry, freeze_with};
use shrink_core::zoo::ModelSpec;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: the caller's layout, passed on as `GlobalAlloc::alloc` received it.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout (every allocation goes there).
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations of the second and third forward passes (batch 4, then 2) of a ResNet-8 plan,
/// and the number of GEMM calls those passes make.
fn allocations_after_warm_up(registry: &KernelRegistry) -> (usize, usize) {
    let device = BackendKind::Flex.device().unwrap();
    let g = ModelSpec::CifarResnet { depth: 8, width: 1.0 }.build([1, 28, 28], 10, 0, &device).unwrap();
    let mut plan = freeze_with(&g, registry, &FreezeOptions::default()).unwrap();
    // Convolutions make one GEMM call per image, the classifier one per batch.
    let convs = plan.kernels().iter().filter(|(_, k)| k.starts_with("conv2d")).count();
    let gemm_calls = convs * (4 + 2) + 2;
    let input = vec![0.5f32; 4 * 28 * 28];
    plan.run(&input, 4).unwrap();
    // The counter sees every thread. rayon starts its worker threads asynchronously, and a
    // worker allocates its queues when it first runs, which on a loaded machine can fall inside
    // the measured window (seen in CI: 4 allocations). Make every worker of the global pool
    // (burn's) run once first; the plan's own worker ran the warm-up pass above.
    rayon::broadcast(|_| ());
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    plan.run(&input, 4).unwrap();
    plan.run(&input[..2 * 28 * 28], 2).unwrap();
    let after = ALLOCATIONS.load(Ordering::SeqCst);
    // A larger batch grows the buffers once.
    plan.run(&vec![0.5f32; 8 * 28 * 28], 8).unwrap();
    assert!(ALLOCATIONS.load(Ordering::SeqCst) > after);
    (after - before, gemm_calls)
}

// One test: the allocation counter is global, and tests in one binary run in parallel.
#[test]
fn forward_passes_allocate_nothing_but_inside_the_gemm_crate() {
    // Default kernels (rten-gemm: weights pre-packed, thread-local packing buffers, virtual
    // im2col): nothing. The plan hands each pass to its single-thread rayon pool, whose job queue
    // allocates a new block every 63 jobs, so one allocation is tolerated.
    let (allocations, _) = allocations_after_warm_up(&KernelRegistry::default());
    eprintln!("default kernels: {allocations} allocations");
    assert!(allocations <= 1, "two forward passes allocated {allocations} times");

    // The `gemm` crate allocates its packing buffers inside every call:
    // at most two allocations per GEMM call, nothing else.
    let (allocations, gemm_calls) = allocations_after_warm_up(&KernelRegistry::gemm_crate());
    eprintln!("gemm-crate kernels: {allocations} allocations for {gemm_calls} GEMM calls");
    assert!(allocations <= 2 * gemm_calls, "{allocations} allocations for {gemm_calls} GEMM calls");
}
