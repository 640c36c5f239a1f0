//! burn's forward latency of zoo models, batch 1 and 32, one thread, on every compiled-in
//! backend (burn-wgpu too, with `--features wgpu`); groups are named by backend so their ratios
//! can be read side by side. Each iteration reads the logits back to the host, so a GPU's queue
//! is drained inside the timing.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use shrink_bench::{forward_cases, model_and_input};
use shrink_core::BackendKind;

fn forward(c: &mut Criterion) {
    shrink_core::backend::set_cpu_threads(1);
    for backend in [BackendKind::Flex, BackendKind::Ndarray, BackendKind::Wgpu] {
        if !backend.is_compiled_in() {
            continue;
        }
        let mut group = c.benchmark_group(format!("zoo_forward/{}", backend.runner_label()));
        group.sample_size(20);
        for (label, spec, input) in forward_cases() {
            for batch in [1usize, 32] {
                let (graph, x) = model_and_input(&spec, input, batch, backend);
                group.throughput(Throughput::Elements(batch as u64));
                group.bench_with_input(BenchmarkId::new(label, batch), &batch, |b, _| {
                    b.iter(|| graph.forward(x.clone()).into_data())
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, forward);
criterion_main!(benches);
