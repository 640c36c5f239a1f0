//! Criterion version of the `runtime` suite (`cargo xtask bench runtime` writes the ratio
//! table): shrink's CPU plan and burn's backends on the same work, one thread.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shrink_bench::runtime::runtime_cases;

fn runtime(c: &mut Criterion) {
    shrink_core::backend::set_cpu_threads(1);
    for case in runtime_cases() {
        let mut group = c.benchmark_group(format!("runtime/{}", case.name));
        group.sample_size(10);
        group.throughput(Throughput::Elements(case.flops as u64));
        for mut contender in case.contenders {
            group.bench_function(contender.runner.clone(), |b| b.iter(|| (contender.run)()));
        }
        group.finish();
    }
}

criterion_group!(benches, runtime);
criterion_main!(benches);
