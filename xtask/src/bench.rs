//! `cargo xtask bench <suite>`: runs a benchmark suite side by side in one process at one thread
//! and writes `runs/bench/<suite>.json` and `.md`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Result, bail};
use serde::Serialize;
use shrink_bench::runtime::{Case, runtime_cases};

/// One measured row.
#[derive(Debug, Serialize)]
pub struct Row {
    /// Case and runner, e.g. `gemm 512x512x512 / cpu-plan`.
    pub name: String,
    /// Median time.
    pub value: f64,
    /// Unit of `value`.
    pub unit: &'static str,
    /// Throughput in GFLOP/s.
    pub gflops: f64,
    /// Speed relative to the named baseline: baseline time / this time (> 1: faster).
    pub ratio: f64,
    /// The runner the ratio is against.
    pub baseline: String,
}

#[derive(Serialize)]
struct SuiteReport {
    suite: String,
    threads: usize,
    repeats: usize,
    git_revision: String,
    cpu: String,
    rows: Vec<Row>,
}

fn measure(mut case: Case, repeats: usize) -> Vec<Row> {
    for c in &mut case.contenders {
        (c.run)();
        (c.run)();
    }
    // Interleave the contenders so that noise from the shared machine hits all of them alike.
    let mut times = vec![Vec::with_capacity(repeats); case.contenders.len()];
    for _ in 0..repeats {
        for (i, c) in case.contenders.iter_mut().enumerate() {
            let start = Instant::now();
            (c.run)();
            times[i].push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let medians: Vec<f64> = times
        .iter_mut()
        .map(|t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect();
    let base = case.contenders.iter().position(|c| c.runner == case.baseline).map(|i| medians[i]);
    case.contenders
        .iter()
        .zip(&medians)
        .map(|(c, &ms)| Row {
            name: format!("{} / {}", case.name, c.runner),
            value: ms,
            unit: "ms",
            gflops: case.flops / (ms * 1e-3) / 1e9,
            ratio: base.map_or(f64::NAN, |b| b / ms),
            baseline: case.baseline.clone(),
        })
        .collect()
}

/// burn-ndarray's matmul (matrixmultiply) runs its own thread pool, sized by
/// `MATMUL_NUM_THREADS` and read once per process. A one-thread suite therefore runs in a child
/// process with that variable set; returns `Some(exit code)` when it did so.
pub fn in_single_threaded_child() -> Option<std::process::ExitCode> {
    if std::env::var("MATMUL_NUM_THREADS").as_deref() == Ok("1") {
        return None;
    }
    let exe = std::env::current_exe().ok()?;
    let status =
        std::process::Command::new(exe).args(std::env::args_os().skip(1)).env("MATMUL_NUM_THREADS", "1").status();
    Some(match status {
        Ok(s) if s.success() => std::process::ExitCode::SUCCESS,
        Ok(s) => std::process::ExitCode::from(s.code().unwrap_or(1).clamp(1, 255) as u8),
        Err(e) => {
            eprintln!("error: cannot start the benchmark process: {e}");
            std::process::ExitCode::from(1)
        }
    })
}

/// Runs `suite`, writes its report under `out/bench/`, returns the JSON path.
pub fn run_suite(suite: &str, out: &Path, repeats: usize) -> Result<PathBuf> {
    let cases = match suite {
        "runtime" => runtime_cases,
        "quant" => shrink_bench::quant::quant_cases,
        "prune" => shrink_bench::prune::prune_cases,
        other => bail!("unknown bench suite `{other}`: expected one of runtime, quant, prune"),
    };
    let threads = shrink_core::backend::set_cpu_threads(1);
    if threads != 1 {
        bail!("the thread pool was already started with {threads} threads");
    }
    let mut rows = Vec::new();
    for case in cases() {
        eprintln!("bench: {}", case.name);
        rows.extend(measure(case, repeats));
    }
    let (git_revision, cpu) = (crate::report::git_revision(), crate::report::cpu_model());
    let report = SuiteReport { suite: suite.into(), threads, repeats, git_revision, cpu, rows };
    let dir = out.join("bench");
    let json = dir.join(format!("{suite}.json"));
    shrink_core::io::write_atomic(&json, serde_json::to_string_pretty(&report)?.as_bytes())?;
    let mut md = format!(
        "# bench `{suite}` — {} thread, median of {} interleaved runs\n\ngit {}; CPU {}\n\n| case / runner | median | GFLOP/s | ratio vs baseline |\n|---|---|---|---|\n",
        report.threads, report.repeats, report.git_revision, report.cpu
    );
    for r in &report.rows {
        md += &format!(
            "| {} | {:.3} {} | {:.1} | {:.2}× vs {} |\n",
            r.name, r.value, r.unit, r.gflops, r.ratio, r.baseline
        );
    }
    shrink_core::io::write_atomic(&dir.join(format!("{suite}.md")), md.as_bytes())?;
    eprint!("{md}");
    Ok(json)
}
