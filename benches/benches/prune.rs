//! Criterion version of the `prune` suite (`cargo xtask bench prune` writes the ratio
//! table): shrink-prune's sparse kernels and pruned plans against the dense f32 plan, one thread.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shrink_bench::prune::prune_cases;

fn prune(c: &mut Criterion) {
    shrink_core::backend::set_cpu_threads(1);
    for case in prune_cases() {
        let mut group = c.benchmark_group(format!("prune/{}", case.name));
        group.sample_size(10);
        group.throughput(Throughput::Elements(case.flops as u64));
        for mut contender in case.contenders {
            group.bench_function(contender.runner.clone(), |b| b.iter(|| (contender.run)()));
        }
        group.finish();
    }
}

criterion_group!(benches, prune);
criterion_main!(benches);
