//! `cargo xtask bench <suite>`: runs a benchmark suite side by side in one process at one thread
//! and writes `runs/bench/<suite>.json` and `.md`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
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
    let medians: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
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

/// The median of `times` (sorted in place).
pub(crate) fn median(times: &mut [f64]) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
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

/// Runs `suite`, writes its report under `out/bench/`, returns the JSON path (`None`: skipped,
/// with the reason on stderr). `run` is the run directory the `onnxruntime` suite times.
pub fn run_suite(suite: &str, out: &Path, repeats: usize, run: Option<&Path>) -> Result<Option<PathBuf>> {
    if suite == "onnxruntime" {
        return onnxruntime_suite(out, repeats, run);
    }
    let cases = match suite {
        "runtime" => runtime_cases,
        "quant" => shrink_bench::quant::quant_cases,
        "prune" => shrink_bench::prune::prune_cases,
        "isa" => shrink_bench::quant::isa_cases,
        other => bail!("unknown bench suite `{other}`: expected one of runtime, quant, prune, isa, onnxruntime"),
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
    let about = if suite == "isa" { ISA_ABOUT } else { "" };
    write_suite(suite, threads, repeats, rows, out, about).map(Some)
}

/// What the `isa` suite's rows mean.
const ISA_ABOUT: &str = "\n`[path; int8 on GEMM]`: the kernel path (`SHRINK_ISA`) both plans were built on, and the \
integer GEMM it gives. Ratio: the int8 plan against the f32 plan of the same path, timed interleaved. The f32 \
plan's convolutions run on the direct kernel of the path (under `portable`, im2col on rten-gemm, which picks \
its own vector kernel: that row is not scalar f32), its linear layers on rten-gemm in every row; the int8 \
plan's convolutions run on the path's direct kernel (under `portable`, im2col on a plain loop).\n";

/// Writes a suite's `json` and `md` under `out/bench/`; returns the JSON path.
fn write_suite(
    suite: &str,
    threads: usize,
    repeats: usize,
    rows: Vec<Row>,
    out: &Path,
    about: &str,
) -> Result<PathBuf> {
    let (git_revision, cpu) = (crate::report::git_revision(), crate::report::cpu_model());
    let report = SuiteReport { suite: suite.into(), threads, repeats, git_revision, cpu, rows };
    let dir = out.join("bench");
    let json = dir.join(format!("{suite}.json"));
    shrink_core::io::write_atomic(&json, serde_json::to_string_pretty(&report)?.as_bytes())?;
    let mut md = format!(
        "# bench `{suite}` — {} thread, median of {} interleaved runs\n\ngit {}; CPU {}\n{about}\n| case / runner | median | GFLOP/s | ratio vs baseline |\n|---|---|---|---|\n",
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

/// The `onnxruntime` suite: the model of a run directory (default: the newest complete run of
/// `configs/resnet_int8.toml` under `out`) on shrink's f32 and integer plans beside ONNX Runtime
/// on the run's exported `model.onnx` and `model.int8.onnx` — the same weights — at batch 1
/// and 64, one thread, interleaved. shrink's f32 plan runs the graph imported back from
/// `model.onnx` (export → import is exact), its integer plan the run's quantized model file;
/// a fifth row runs the f32 plan with its convolutions on im2col + rten-gemm
/// (`KernelRegistry::im2col_gemm`), the kernel the direct convolution replaced.
/// Skipped, with the reason, where ONNX Runtime is not installed.
fn onnxruntime_suite(out: &Path, repeats: usize, run: Option<&Path>) -> Result<Option<PathBuf>> {
    if let Err(why) = xtask::onnxruntime::available() {
        eprintln!("bench onnxruntime skipped: {why}");
        return Ok(None);
    }
    let run = match run {
        Some(r) => r.to_path_buf(),
        None => newest_complete_run(&out.join("resnet_int8"))?,
    };
    for file in ["model.onnx", "model.int8.onnx", "model.safetensors"] {
        if !run.join(file).is_file() {
            bail!(
                "{} has no {file}: the suite needs a run with `[export] onnx = true` and a quantize stage \
                 (`cargo xtask run configs/resnet_int8.toml`)",
                run.display()
            );
        }
    }
    let threads = shrink_core::backend::set_cpu_threads(1);
    if threads != 1 {
        bail!("the thread pool was already started with {threads} threads");
    }
    let device = shrink_core::BackendKind::Flex.device()?;
    let graph = shrink_core::onnx::import(&run.join("model.onnx"), &Default::default(), &device)?.graph;
    let quantized = shrink_quant::QuantizedModel::load(&run.join("model.safetensors"), &device)?;
    let macs = shrink_core::metrics::model_stats(&graph)?.macs as f64;
    // The model's name as the run's report gives it (`resnet20`, `lenet5`, …).
    let model = std::fs::read_to_string(run.join("report.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|r| r["model"].as_str().map(String::from))
        .unwrap_or_else(|| "model".into());
    let [c, h, w] = graph.input_shape();
    let mut f32_plan = shrink_core::runtime::freeze(&graph)?;
    let mut im2col_plan = shrink_core::runtime::freeze_with(
        &graph,
        &shrink_core::runtime::KernelRegistry::im2col_gemm(),
        &Default::default(),
    )?;
    let mut int8_plan = quantized.freeze(1)?;
    let mut server = xtask::onnxruntime::BenchServer::start()?;
    server.load("f32", &run.join("model.onnx"))?;
    server.load("int8", &run.join("model.int8.onnx"))?;
    let names =
        ["shrink f32 plan", "shrink int8 plan", "onnxruntime f32", "onnxruntime int8", "shrink f32 im2col-gemm"];
    let baselines = ["onnxruntime f32", "onnxruntime int8", "onnxruntime f32", "onnxruntime int8", "onnxruntime f32"];
    let mut rows = Vec::new();
    for batch in [1usize, 64] {
        eprintln!("bench: {model} b{batch}");
        let input = random_batch(batch, [c, h, w], &device)?;
        let shape = [batch, c, h, w];
        let mut time = |k: usize| -> Result<f64> {
            Ok(match k {
                0 => {
                    let start = Instant::now();
                    f32_plan.run(&input, batch)?;
                    start.elapsed().as_secs_f64() * 1e3
                }
                1 => {
                    let start = Instant::now();
                    int8_plan.run(&input, batch)?;
                    start.elapsed().as_secs_f64() * 1e3
                }
                2 => server.run("f32", shape)?,
                3 => server.run("int8", shape)?,
                _ => {
                    let start = Instant::now();
                    im2col_plan.run(&input, batch)?;
                    start.elapsed().as_secs_f64() * 1e3
                }
            })
        };
        for k in 0..names.len() {
            time(k)?;
            time(k)?;
        }
        let mut times: Vec<Vec<f64>> = (0..names.len()).map(|_| Vec::with_capacity(repeats)).collect();
        for _ in 0..repeats {
            for (k, t) in times.iter_mut().enumerate() {
                t.push(time(k)?);
            }
        }
        let medians: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
        for k in 0..names.len() {
            let base = names.iter().position(|n| *n == baselines[k]).expect("a contender");
            rows.push(Row {
                name: format!("{model} b{batch} / {}", names[k]),
                value: medians[k],
                unit: "ms",
                gflops: 2.0 * macs * batch as f64 / (medians[k] * 1e-3) / 1e9,
                ratio: medians[base] / medians[k],
                baseline: baselines[k].into(),
            });
        }
    }
    let input = random_batch(1, [c, h, w], &device)?;
    rows.extend(two_thread_rows(&graph, &quantized, &run, &mut server, &input, [c, h, w], macs, repeats, &model)?);
    let about = format!(
        "\nModel: `{}` (its `model.onnx` imported back for shrink's f32 plan, its quantized `model.safetensors` \
         for the integer plan; ONNX Runtime on the same weights: `model.onnx` and `model.int8.onnx`, full graph \
         optimisation, one intra-op thread). Ratio > 1: faster than the ONNX Runtime contender of the same precision.\n\n\
         The `b1 threads` cases run batch 1 at one and two threads (ONNX Runtime: two intra-op threads), each \
         contender {BLOCK} passes in a row per round after a 20 ms pause (as a model serving one request after \
         another runs, with the threads of the contender before it asleep), on an idle machine and with two busy threads beside it (spinning while a contender runs); their ratios are \
         against the same runner at one thread, and the `b1, 2 threads` rows against ONNX Runtime at two threads. \
         These are not gated: two-thread timings on a shared CI runner are too noisy.\n",
        run.display()
    );
    write_suite("onnxruntime", threads, repeats, rows, out, &about).map(Some)
}

/// `batch` images of shape `[c, h, w]`, normal random values (seed 1): what the `onnxruntime`
/// suite times (speed does not depend on the values).
fn random_batch(batch: usize, [c, h, w]: [usize; 3], device: &shrink_core::burn::tensor::Device) -> Result<Vec<f32>> {
    let normal = shrink_core::burn::tensor::Distribution::Normal(0.0, 1.0);
    Ok(shrink_core::host::floats(shrink_core::InitRng::seeded(1).tensor([batch, c, h, w], normal, device))?)
}

/// Passes each contender of the `b1 threads` cases runs in a row per round.
const BLOCK: usize = 10;

/// The `b1 threads` cases of the `onnxruntime` suite: batch 1 on shrink's f32 and integer plans
/// and ONNX Runtime at one and two threads, on an idle machine and with two busy threads
/// beside it. Each round runs every contender [`BLOCK`] times in a row, so a plan's helper
/// threads are awake as they are for a model serving requests back to back.
#[allow(clippy::too_many_arguments)]
fn two_thread_rows(
    graph: &shrink_core::Graph,
    quantized: &shrink_quant::QuantizedModel,
    run: &Path,
    server: &mut xtask::onnxruntime::BenchServer,
    input: &[f32],
    [c, h, w]: [usize; 3],
    macs: f64,
    repeats: usize,
    model: &str,
) -> Result<Vec<Row>> {
    use shrink_core::runtime::{FreezeOptions, KernelRegistry, freeze_with};
    let registry = KernelRegistry::default();
    let f32_1 = &mut freeze_with(graph, &registry, &FreezeOptions { threads: 1 })?;
    let f32_2 = &mut freeze_with(graph, &registry, &FreezeOptions { threads: 2 })?;
    let (int8_1, int8_2) = (&mut quantized.freeze(1)?, &mut quantized.freeze(2)?);
    server.load_with_threads("f32-2t", &run.join("model.onnx"), 2)?;
    server.load_with_threads("int8-2t", &run.join("model.int8.onnx"), 2)?;
    let shape = [1, c, h, w];
    // (runner, its one-thread baseline)
    let names = [
        ("shrink f32 plan", "shrink f32 plan"),
        ("shrink f32 plan, 2 threads", "shrink f32 plan"),
        ("onnxruntime f32", "onnxruntime f32"),
        ("onnxruntime f32, 2 threads", "onnxruntime f32"),
        ("shrink int8 plan", "shrink int8 plan"),
        ("shrink int8 plan, 2 threads", "shrink int8 plan"),
        ("onnxruntime int8", "onnxruntime int8"),
        ("onnxruntime int8, 2 threads", "onnxruntime int8"),
    ];
    let mut rows = Vec::new();
    for hogs in [0usize, 2] {
        let case = match hogs {
            0 => format!("{model} b1 threads"),
            n => format!("{model} b1 threads, {n} busy threads beside"),
        };
        eprintln!("bench: {case}");
        let load = shrink_bench::runtime::Hogs::start(hogs);
        let mut time = |k: usize| -> Result<f64> {
            load.set_busy(hogs > 0);
            let timed = |plan: &mut shrink_core::runtime::Plan| -> Result<f64> {
                let start = Instant::now();
                plan.run(input, 1)?;
                Ok(start.elapsed().as_secs_f64() * 1e3)
            };
            let ms = match k {
                0 => timed(f32_1)?,
                1 => timed(f32_2)?,
                2 => server.run("f32", shape)?,
                3 => server.run("f32-2t", shape)?,
                4 => timed(int8_1)?,
                5 => timed(int8_2)?,
                6 => server.run("int8", shape)?,
                _ => server.run("int8-2t", shape)?,
            };
            load.set_busy(false);
            Ok(ms)
        };
        let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(repeats * BLOCK); names.len()];
        for round in 0..=repeats {
            for (k, t) in times.iter_mut().enumerate() {
                // Long enough for the threads of the contender before (ONNX Runtime's spin
                // for milliseconds after a run) to go to sleep: each block starts on a quiet
                // machine, as a model does that gets its requests alone.
                std::thread::sleep(std::time::Duration::from_millis(20));
                for _ in 0..BLOCK {
                    let ms = time(k)?;
                    // The first round warms up.
                    if round > 0 {
                        t.push(ms);
                    }
                }
            }
        }
        let medians: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
        let at = |runner: &str| names.iter().position(|n| n.0 == runner).expect("a contender");
        for (k, (runner, baseline)) in names.iter().enumerate() {
            rows.push(Row {
                name: format!("{case} / {runner}"),
                value: medians[k],
                unit: "ms",
                gflops: 2.0 * macs / (medians[k] * 1e-3) / 1e9,
                ratio: medians[at(baseline)] / medians[k],
                baseline: (*baseline).into(),
            });
        }
        for (runner, peer) in [("shrink f32 plan", "onnxruntime f32"), ("shrink int8 plan", "onnxruntime int8")] {
            let (ours, theirs) =
                (medians[at(&format!("{runner}, 2 threads"))], medians[at(&format!("{peer}, 2 threads"))]);
            rows.push(Row {
                name: format!(
                    "{model} b1, 2 threads{} / {runner}",
                    if hogs > 0 { ", busy threads beside" } else { "" }
                ),
                value: ours,
                unit: "ms",
                gflops: 2.0 * macs / (ours * 1e-3) / 1e9,
                ratio: theirs / ours,
                baseline: format!("{peer}, 2 threads"),
            });
        }
    }
    Ok(rows)
}

/// The newest run directory under `dir` (`<name>/<timestamp>`) whose report says `complete`.
fn newest_complete_run(dir: &Path) -> Result<PathBuf> {
    let mut runs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    runs.sort();
    runs.into_iter()
        .rev()
        .find(|r| {
            std::fs::read_to_string(r.join("report.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .is_some_and(|v| v["status"] == "complete")
        })
        .with_context(|| {
            format!(
                "no complete run under {}: run `cargo xtask run configs/resnet_int8.toml` first, or pass --run RUN_DIR",
                dir.display()
            )
        })
}
