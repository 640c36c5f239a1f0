//! `cargo xtask`: shrink's experiment runner.
//!
//! - `cargo xtask run <config.toml>... [--dry-run] [--out DIR] [--fresh] [-v|-q]` runs experiments;
//!   stdout carries only the run directories, progress and logs go to stderr and `log.txt`. A
//!   run that stopped unfinished (killed, or a failed stage) resumes from its last finished stage
//!   when the same config is run again by the same revision; `--fresh` starts over.
//! - `cargo xtask sweep <sweep.toml> [--jobs N] [--resume|--fresh] [--dry-run]` runs a sweep's
//!   trials (`xtask::sweep`) and writes its report and Pareto charts; rerun to resume it.
//! - `cargo xtask search <search.toml> [--fresh] [--dry-run]` runs an accuracy-driven search
//!   (`xtask::search`), keeping the best model so far in its directory; rerun to resume it.
//!   With `--slurm` both submit their trials to Slurm (`slurm_run`); `sweep --collect DIR`
//!   follows a sweep submitted with `--detach`.
//! - `cargo xtask prepare <config.toml>...` trains the baselines the configs' runs share.
//! - `cargo xtask bench <suite>` runs a benchmark suite at one thread (`runs/bench/<suite>.json`).
//! - `cargo xtask bench-compare BASE HEAD` compares two commits' bench ratios (the PR gate).
//! - `cargo xtask export RUN_DIR --onnx FILE` writes a run's model as ONNX (QDQ when quantized).
//! - `cargo xtask check` runs the CI steps (fmt, clippy, docs, tests with wgpu), as `.ci/run`.
//! - `cargo xtask list` lists configs, models and backends.
//!
//! Exit codes: 0 success, 1 a run failed, 2 bad input (config, data or model file).

mod bench;
mod cache;
mod checkpoint;
mod data;
mod export;
mod measure;
mod prepare;
mod profile;
mod progress;
mod report;
mod run;
mod search_run;
mod slurm_run;
mod stages;
mod sweep_run;

use xtask::{config, plan};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{ConfigError, load_plan};
use crate::run::{RunOptions, run_plan};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "shrink's experiment runner", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// More log output on stderr (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    quiet: bool,
}

/// Running the trials on Slurm: each option overrides the same key of the file's `[slurm]`.
#[derive(Args, Clone, Debug, Default)]
struct SlurmArgs {
    /// Submit the trials to Slurm as one job array (after one job that trains the shared
    /// baseline) and follow them; OUT must be on a filesystem the nodes share.
    #[arg(long)]
    slurm: bool,
    /// With --slurm: submit and return; `--collect DIR` follows the sweep later.
    #[arg(long, requires = "slurm")]
    detach: bool,
    /// With --slurm: the xtask binary the tasks run (default: this one, copied to OUT/bin/).
    #[arg(long, requires = "slurm")]
    binary: Option<PathBuf>,
    /// Slurm partition.
    #[arg(long, requires = "slurm")]
    partition: Option<String>,
    /// Slurm account.
    #[arg(long, requires = "slurm")]
    account: Option<String>,
    /// Time limit per task (`MM`, `HH:MM:SS`, `D-HH:MM:SS`, …).
    #[arg(long, requires = "slurm")]
    time: Option<String>,
    /// CPUs per task (also the trials' thread count; default: the base config's `threads`).
    #[arg(long, requires = "slurm")]
    cpus_per_task: Option<usize>,
    /// Memory per task (`4G`, `500M`).
    #[arg(long, requires = "slurm")]
    mem: Option<String>,
    /// At most this many tasks at once (`--array=…%K`).
    #[arg(long, requires = "slurm")]
    parallel: Option<usize>,
    /// More sbatch options, one per flag (`--sbatch=--qos=short`).
    #[arg(long = "sbatch", value_name = "OPTION", requires = "slurm", allow_hyphen_values = true)]
    sbatch: Vec<String>,
}

impl SlurmArgs {
    fn flags(self) -> slurm_run::SlurmFlags {
        slurm_run::SlurmFlags {
            slurm: self.slurm,
            detach: self.detach,
            binary: self.binary,
            settings: xtask::slurm::SlurmSettings {
                partition: self.partition,
                account: self.account,
                time: self.time,
                cpus_per_task: self.cpus_per_task,
                mem: self.mem,
                parallel: self.parallel,
                sbatch: self.sbatch,
            },
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run experiments from TOML configs.
    Run {
        /// Config files.
        #[arg(required = true)]
        configs: Vec<PathBuf>,
        /// Parse and validate only; load nothing, run nothing.
        #[arg(long)]
        dry_run: bool,
        /// Root of the run directories.
        #[arg(long, default_value = "runs")]
        out: PathBuf,
        /// Where trained baselines are cached (default: `OUT/cache/baselines`).
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Start a new run directory even when the last run of the same config stopped
        /// unfinished (by default that run resumes from its last finished stage).
        #[arg(long)]
        fresh: bool,
    },
    /// Run a sweep: a base config and axes over its fields, each trial an ordinary run under
    /// `OUT/sweeps/<name>/<timestamp>/`; writes `sweep.json`, `report.md` and Pareto charts.
    /// Rerunning the same command resumes the sweep (finished trials are kept).
    Sweep {
        /// The sweep file (e.g. `configs/sweeps/resnet_pareto.toml`).
        #[arg(required_unless_present = "collect")]
        file: Option<PathBuf>,
        /// Trials run side by side; each gets the machine's cores divided by this as threads.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Root of the output: the sweep is under `OUT/sweeps/`.
        #[arg(long, default_value = "runs")]
        out: PathBuf,
        /// Where trained baselines are cached (default: `OUT/cache/baselines`, shared with runs).
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Continue the last sweep of this name even though the sweep file changed since it
        /// began (finished trials whose config is unchanged are kept).
        #[arg(long)]
        resume: bool,
        /// Start a new sweep directory even when the last one is unfinished.
        #[arg(long, conflicts_with = "resume")]
        fresh: bool,
        /// Parse the sweep and validate every trial's config; run nothing.
        #[arg(long)]
        dry_run: bool,
        /// Follow a sweep submitted with `--slurm --detach` until its trials end, and write its
        /// report; no sweep file is needed.
        #[arg(long, value_name = "DIR", conflicts_with_all = ["slurm", "resume", "fresh", "dry_run"])]
        collect: Option<PathBuf>,
        #[command(flatten)]
        slurm: SlurmArgs,
    },
    /// Run an accuracy-driven search: the smallest / fastest / cheapest model within a tolerated
    /// loss of validation top-1, under `OUT/searches/<name>/<timestamp>/`; the best model so far
    /// is always in its `best/`. Rerunning the same command resumes the search.
    Search {
        /// The search file (e.g. `configs/search/resnet_int_mixed.toml`).
        file: PathBuf,
        /// Root of the output: the search is under `OUT/searches/`.
        #[arg(long, default_value = "runs")]
        out: PathBuf,
        /// Where trained baselines are cached (default: `OUT/cache/baselines`, shared with runs).
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Start a new search directory even when the last one of the same file is unfinished.
        #[arg(long)]
        fresh: bool,
        /// Parse the search and validate its first trial's config; run nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        slurm: SlurmArgs,
    },
    /// Train (or find in the cache) the models the configs' runs share — baselines and
    /// teachers — and nothing else: what a sweep on Slurm runs before its trials.
    Prepare {
        /// Config files.
        #[arg(required = true)]
        configs: Vec<PathBuf>,
        /// Where trained baselines are cached.
        #[arg(long, default_value = "runs/cache/baselines")]
        cache: PathBuf,
        /// Write this JSON file (host, time, models) when done.
        #[arg(long)]
        mark: Option<PathBuf>,
    },
    /// Run a benchmark suite side by side at one thread; writes `OUT/bench/<suite>.json`.
    Bench {
        /// Suite: `runtime`, `quant`, `prune`, `isa` (every kernel path this CPU has) or `onnxruntime`.
        suite: String,
        /// Root of the output (`runs`).
        #[arg(long, default_value = "runs")]
        out: PathBuf,
        /// Timed runs per contender.
        #[arg(long, default_value_t = 15)]
        repeats: usize,
        /// The run whose model the `onnxruntime` suite times (default: the newest complete run
        /// of `configs/resnet_int8.toml` under OUT).
        #[arg(long)]
        run: Option<PathBuf>,
    },
    /// Time a run's model step by step on the CPU plans (one thread): the f32 plan and, for a
    /// quantized model, the integer plan, with each step's kernel and share of the time.
    Profile {
        /// The run directory (holding `model.safetensors`).
        run_dir: PathBuf,
        /// Images per pass.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Profiled passes (the median is shown).
        #[arg(long, default_value_t = 20)]
        repeats: usize,
    },
    /// Compare the bench ratios of two commits (`<suite>.json` under each directory) and fail
    /// (exit 1) when one of shrink's ratios against ONNX Runtime or burn-ndarray fell by more
    /// than the tolerance: the pull-request gate of the bench workflow. Prints a Markdown table.
    BenchCompare {
        /// The base commit's bench directory (e.g. `base/bench`).
        base: PathBuf,
        /// The head commit's bench directory.
        head: PathBuf,
        /// Largest tolerated fall of a gated ratio (0.10: 10 %).
        #[arg(long, default_value_t = 0.10)]
        tolerance: f64,
    },
    /// Export a run's model as ONNX: QDQ int8 when the run quantized it, f32 otherwise.
    Export {
        /// The run directory (holding `model.safetensors`).
        run_dir: PathBuf,
        /// The ONNX file to write.
        #[arg(long)]
        onnx: PathBuf,
        /// Opset of the default domain: 13 or 17.
        #[arg(long, default_value_t = 17)]
        opset: i64,
        /// Fold batch norms into the convolutions (an f32 model; a quantized one has them folded).
        #[arg(long)]
        fold_batch_norms: bool,
    },
    /// Run the CI steps: fmt --check, clippy -D warnings, docs -D warnings, the tests (wgpu included).
    Check,
    /// List configs, zoo models and compiled-in backends.
    List,
}

/// A writer whose target file is swapped for each run, so every run gets its own `log.txt`.
#[derive(Clone, Default)]
struct RunLog(Arc<Mutex<Option<std::fs::File>>>);

impl RunLog {
    fn set(&self, file: Option<std::fs::File>) {
        *self.0.lock().expect("log lock") = file;
    }
}

struct RunLogWriter(Arc<Mutex<Option<std::fs::File>>>);

impl Write for RunLogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.lock().expect("log lock").as_mut() {
            Some(f) => f.write(buf),
            None => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self.0.lock().expect("log lock").as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl<'a> MakeWriter<'a> for RunLog {
    type Writer = RunLogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        RunLogWriter(self.0.clone())
    }
}

/// The target of events meant for `log.txt` alone (what stderr already shows another way).
const LOG_ONLY: &str = "shrink_log_only";

/// Logging: stderr at the level asked (override with `SHRINK_LOG`), `log.txt` at info; the
/// GPU stack's chatter is filtered out of both.
fn init_logging(verbose: u8, quiet: bool) -> RunLog {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let noise = "wgpu_core=warn,wgpu_hal=warn,naga=warn,cubecl=warn";
    let stderr_filter = EnvFilter::try_from_env("SHRINK_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},{noise},{LOG_ONLY}=off")));
    let log = RunLog::default();
    let file_filter = EnvFilter::new(format!("info,{noise}"));
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                // Colour codes only where a person reads them: not in CI logs, pipes or files.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr)
                .with_filter(stderr_filter),
        )
        .with(tracing_subscriber::fmt::layer().with_ansi(false).with_writer(log.clone()).with_filter(file_filter))
        .init();
    log
}

use tracing_subscriber::Layer;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = init_logging(cli.verbose, cli.quiet);
    // A kernel path named by SHRINK_ISA that does not exist or this CPU lacks: said once, here.
    if let Err(e) = shrink_core::kernels::isa::from_env() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match cli.command {
        Command::Run { configs, dry_run, out, cache, fresh } => {
            let cache = cache.unwrap_or_else(|| out.join("cache").join("baselines"));
            run_configs(&configs, dry_run, fresh, &RunOptions { out, cache, progress: !cli.quiet }, &log)
        }
        Command::Sweep { file, jobs, out, cache, resume, fresh, dry_run, collect, slurm } => {
            match usable_cache(cache, &out) {
                Ok(cache) => sweep_run::sweep(
                    file.as_deref(),
                    &sweep_run::SweepOptions {
                        out,
                        cache,
                        jobs,
                        resume,
                        fresh,
                        dry_run,
                        slurm: slurm.flags(),
                        collect,
                    },
                ),
                Err(code) => code,
            }
        }
        Command::Search { file, out, cache, fresh, dry_run, slurm } => match usable_cache(cache, &out) {
            Ok(cache) => search_run::search(
                &file,
                &search_run::SearchOptions { out, cache, fresh, dry_run, slurm: slurm.flags() },
            ),
            Err(code) => code,
        },
        Command::Prepare { configs, cache, mark } => {
            let opts = RunOptions { out: std::env::temp_dir(), cache, progress: false };
            sweep_run::exit_code(prepare::prepare(&configs, &opts, mark.as_deref()).map(|()| ExitCode::SUCCESS))
        }
        Command::Bench { suite, out, repeats, run } => match bench::in_single_threaded_child() {
            Some(code) => code,
            None => match bench::run_suite(&suite, &out, repeats.max(1), run.as_deref()) {
                Ok(Some(path)) => {
                    println!("{}", path.display());
                    ExitCode::SUCCESS
                }
                Ok(None) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            },
        },
        Command::Profile { run_dir, batch, repeats } => match bench::in_single_threaded_child() {
            Some(code) => code,
            None => match profile::profile_run(&run_dir, batch.max(1), repeats.max(1)) {
                Ok(table) => {
                    println!("{table}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            },
        },
        Command::BenchCompare { base, head, tolerance } => {
            if !(0.0..1.0).contains(&tolerance) {
                eprintln!("error: --tolerance {tolerance}: expected a fraction in [0, 1), e.g. 0.10 for 10 %");
                return ExitCode::from(2);
            }
            match xtask::bench_gate::compare_dirs(&base, &head, tolerance) {
                Ok((table, regressed)) => {
                    println!("{table}");
                    if regressed {
                        eprintln!("error: a gated ratio fell by more than {:.0} % (see the table)", tolerance * 100.0);
                        ExitCode::from(1)
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Export { run_dir, onnx, opset, fold_batch_norms } => {
            match export_run(&run_dir, &onnx, opset, fold_batch_norms) {
                Ok(what) => {
                    eprintln!("{what}");
                    println!("{}", onnx.display());
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("error: {err:#}");
                    ExitCode::from(if is_input_error(&err) { 2 } else { 1 })
                }
            }
        }
        Command::Check => check(),
        Command::List => list(),
    }
}

/// `cargo xtask export`: the run's model file as ONNX; returns what was written.
fn export_run(run_dir: &Path, out: &Path, opset: i64, fold_batch_norms: bool) -> anyhow::Result<String> {
    use anyhow::Context;
    let model = run_dir.join("model.safetensors");
    let bytes = std::fs::read(&model).map_err(|e| shrink_core::Error::Io { path: model.clone(), error: e })?;
    let name = std::fs::read_to_string(run_dir.join("report.json"))
        .ok()
        .and_then(|r| serde_json::from_str::<serde_json::Value>(&r).ok())
        .and_then(|r| Some((r["name"].as_str()?.to_string(), r["provenance"]["git_revision"].as_str()?.to_string())));
    let (config, revision) = name.unwrap_or_else(|| ("unknown".into(), "unknown".into()));
    let settings = config::ExportSettings { onnx: true, opset, fold_batch_norms, check_onnxruntime: false };
    if ![13, 17].contains(&opset) {
        return Err(shrink_core::Error::InvalidSetting {
            key: "--opset".into(),
            message: format!("13 or 17, got {opset}"),
        }
        .into());
    }
    let options = export::options(&settings, &config, &revision);
    let device = shrink_core::BackendKind::Flex.device()?;
    let loaded = shrink_core::io::from_bytes_with(&bytes, &model, &device)?;
    let (onnx, what) = if loaded.annotations.is_some() {
        let q = shrink_quant::QuantizedModel::from_bytes(&bytes, &model, &device)?;
        let (onnx, summary) = shrink_quant::onnx::export_qdq(&q, &options)?;
        let what = format!(
            "QDQ int8: {} integer layers, {} left in f32, {} with a rounded output",
            summary.integer_layers.len(),
            summary.float_layers.len(),
            summary.requantized_outputs.len()
        );
        (onnx, what)
    } else {
        (shrink_core::onnx::export(&loaded.graph, &options)?, "f32".to_string())
    };
    shrink_core::io::write_atomic(out, &onnx).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(format!("{}: {what}, {} bytes, opset {opset}", out.display(), onnx.len()))
}

fn is_input_error(err: &anyhow::Error) -> bool {
    err.downcast_ref::<ConfigError>().is_some()
        || err.downcast_ref::<crate::data::DataError>().is_some()
        || err.chain().any(|e| {
            matches!(
                e.downcast_ref::<shrink_core::Error>(),
                Some(
                    shrink_core::Error::BadFile { .. }
                        | shrink_core::Error::Io { .. }
                        | shrink_core::Error::InvalidSetting { .. }
                        | shrink_core::Error::BackendNotCompiled { .. }
                        | shrink_core::Error::Onnx { .. }
                )
            )
        })
}

fn run_configs(configs: &[PathBuf], dry_run: bool, fresh: bool, opts: &RunOptions, log: &RunLog) -> ExitCode {
    // Every config is validated before anything runs: a typo in the third file must not be
    // found after the first two have trained for an hour.
    let mut plans = Vec::new();
    for path in configs {
        match load_plan(path) {
            Ok(plan) => plans.push(plan),
            Err(err) => {
                eprintln!("error: {err:#}");
                return ExitCode::from(2);
            }
        }
    }
    // The cache directory is checked before anything trains: a `--cache` that names a file
    // would otherwise fail only when the first baseline is stored.
    if let Some(problem) = cache_dir_problem(&opts.cache) {
        eprintln!("error: --cache {}: {problem}", opts.cache.display());
        return ExitCode::from(2);
    }
    if dry_run {
        for plan in &plans {
            let stages: Vec<&str> = plan.stages.iter().map(|s| s.kind()).collect();
            println!(
                "{}: ok — {} on {} ({}, images {:?}), backend {}, stages [{}]",
                plan.source.display(),
                plan.model.name(),
                plan.data.path.display(),
                serde_json::to_string(&plan.data.to_config().kind).unwrap_or_default(),
                plan.data.shape,
                plan.backend,
                stages.join(", ")
            );
        }
        return ExitCode::SUCCESS;
    }
    let mut code = ExitCode::SUCCESS;
    for plan in &plans {
        let resume = match run::resolved_config(plan) {
            Ok(resolved) if !fresh => {
                checkpoint::unfinished_run(&opts.out, &plan.name, &resolved, &report::git_revision())
            }
            _ => None,
        };
        if let Some((dir, previous)) = resume {
            log.set(std::fs::OpenOptions::new().append(true).create(true).open(dir.join("log.txt")).ok());
            tracing::info!(config = %plan.source.display(), "resuming the unfinished run in {}", dir.display());
            code = run_one(plan, opts, &dir, Some(previous), code);
            log.set(None);
            continue;
        }
        let stamp = time::OffsetDateTime::now_utc()
            .format(time::macros::format_description!("[year][month][day]T[hour][minute][second]Z"))
            .unwrap_or_else(|_| "run".into());
        let mut dir = opts.out.join(&plan.name).join(&stamp);
        let mut n = 1;
        while dir.exists() {
            n += 1;
            dir = opts.out.join(&plan.name).join(format!("{stamp}-{n}"));
        }
        if let Err(e) = std::fs::create_dir_all(&dir) {
            eprintln!("error: cannot create {}: {e}", dir.display());
            return ExitCode::from(1);
        }
        log.set(std::fs::File::create(dir.join("log.txt")).ok());
        tracing::info!(config = %plan.source.display(), "run started in {}", dir.display());
        code = run_one(plan, opts, &dir, None, code);
        log.set(None);
    }
    code
}

/// `--cache`, or `OUT/cache/baselines`, when it can be the cache directory; else the error is
/// said and exit code 2 returned.
fn usable_cache(cache: Option<PathBuf>, out: &Path) -> Result<PathBuf, ExitCode> {
    let cache = cache.unwrap_or_else(|| out.join("cache").join("baselines"));
    match cache_dir_problem(&cache) {
        Some(problem) => {
            eprintln!("error: --cache {}: {problem}", cache.display());
            Err(ExitCode::from(2))
        }
        None => Ok(cache),
    }
}

/// Why `dir` cannot be the cache directory, if it cannot: it is not a directory, or it cannot
/// be created.
fn cache_dir_problem(dir: &Path) -> Option<String> {
    if dir.exists() && !dir.is_dir() {
        return Some("exists and is not a directory".into());
    }
    if !dir.exists() {
        // Find the nearest existing ancestor: it must be a directory.
        let mut parent = dir.parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
            parent = p.parent();
        }
        if let Some(p) = parent.filter(|p| !p.as_os_str().is_empty() && !p.is_dir()) {
            return Some(format!("{} is not a directory", p.display()));
        }
    }
    None
}

/// Runs one plan in `dir` (resuming when `previous` is the report of an unfinished run there);
/// the exit code so far, or this run's failure.
fn run_one(
    plan: &plan::Plan,
    opts: &RunOptions,
    dir: &Path,
    previous: Option<report::Report>,
    code: ExitCode,
) -> ExitCode {
    match run_plan(plan, opts, dir, previous) {
        Ok(dir) => {
            println!("{}", dir.display());
            code
        }
        Err(err) => {
            // For log.txt; stderr gets the line below (once).
            tracing::error!(target: LOG_ONLY, "{err:#}");
            eprintln!("error: {}: {err:#}\nreport: {}", plan.source.display(), dir.join("report.json").display());
            if is_input_error(&err) { ExitCode::from(2) } else { ExitCode::from(1) }
        }
    }
}

/// The test command of README.md, in one place (`.ci/run` runs the same).
/// The wgpu tests need a Vulkan driver (CI installs Mesa's lavapipe).
pub const TEST_COMMAND: &[&str] = &["test", "--workspace", "--release", "--features", "xtask/wgpu"];

fn check() -> ExitCode {
    // The same features in every step, so burn compiles once for clippy and docs.
    let steps: [(&str, Vec<&str>); 4] = [
        ("fmt", vec!["fmt", "--all", "--check"]),
        (
            "clippy",
            vec![
                "clippy",
                "--workspace",
                "--release",
                "--all-targets",
                "--features",
                "xtask/wgpu",
                "--",
                "-D",
                "warnings",
            ],
        ),
        ("doc", vec!["doc", "--workspace", "--no-deps", "--release", "--features", "xtask/wgpu"]),
        ("test", TEST_COMMAND.to_vec()),
    ];
    for (name, args) in steps {
        eprintln!("== cargo {}", args.join(" "));
        let status = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(&args)
            .env("RUSTDOCFLAGS", "-D warnings")
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(_) | Err(_) => {
                eprintln!("check failed at step `{name}`");
                return ExitCode::from(1);
            }
        }
    }
    eprintln!("all checks passed");
    ExitCode::SUCCESS
}

fn list() -> ExitCode {
    println!("configs:");
    for dir in ["configs", "configs/smoke", "configs/bench"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        for f in files {
            let summary = load_plan(Path::new(&f))
                .map(|p| format!("{} ({} stages)", p.model.name(), p.stages.len()))
                .unwrap_or_else(|e| format!("INVALID: {e}"));
            println!("  {}  {summary}", f.display());
        }
    }
    println!("models: cifar_resnet (depth 6n+2, width), resnet (18, 34), lenet5, mlp (hidden)");
    println!("data: mnist5k, idx, cifar10, image_folder");
    println!("stages: {}", crate::config::Stage::KINDS.join(", "));
    let backends: Vec<String> = shrink_core::BackendKind::ALL
        .iter()
        .map(|b| match b.cargo_feature() {
            Some(f) if !b.is_compiled_in() => format!("{b} (not compiled in: feature `{f}`)"),
            _ => b.to_string(),
        })
        .collect();
    println!("backends: {}", backends.join(", "));
    ExitCode::SUCCESS
}
