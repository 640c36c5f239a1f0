//! Criterion version of the `quant` suite (`cargo xtask bench quant` writes the ratio
//! table): shrink-quant's integer kernels against the f32 plan, one thread.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shrink_bench::quant::quant_cases;

fn quant(c: &mut Criterion) {
    shrink_core::backend::set_cpu_threads(1);
    for case in quant_cases() {
        let mut group = c.benchmark_group(format!("quant/{}", case.name));
        group.sample_size(10);
        group.throughput(Throughput::Elements(case.flops as u64));
        for mut contender in case.contenders {
            group.bench_function(contender.runner.clone(), |b| b.iter(|| (contender.run)()));
        }
        group.finish();
    }
}

criterion_group!(benches, quant);
criterion_main!(benches);
