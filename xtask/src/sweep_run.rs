//! `cargo xtask sweep`: runs a sweep's trials as ordinary runs, side by side, and reports them.
//!
//! Every trial's config is validated before anything runs. A trial is a child process
//! (`xtask run`) with its config under `<sweep dir>/configs/` and its run directory under
//! `<sweep dir>/trials/`, sharing the baseline cache with every other run (one process trains a
//! baseline, the others wait for it: [`crate::cache`]). Killing the sweep kills its trials (on
//! Linux they die with it); running the same command again continues the same sweep directory:
//! finished trials are kept, unfinished ones resume from their last finished stage. A changed
//! sweep file starts a new sweep directory, unless `--resume` continues the last one.
//!
//! The sweep directory: `sweep.spec.json` (what the trials are), `configs/`, `trials/`, `logs/`,
//! and after every finished trial `sweep.json`, `report.md` and the Pareto charts
//! (`pareto_size.svg`, `pareto_latency.svg`, `pareto_macs.svg`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use xtask::config::{ConfigError, load_plan, parse_plan};
use xtask::sweep::{Base, Sense, Sweep, inline, pareto_front};

use crate::report::{Report, RunStatus};
use crate::slurm_run::{Cluster, SlurmFlags, TaskState};

/// Options from the command line.
pub struct SweepOptions {
    pub out: PathBuf,
    pub cache: PathBuf,
    pub jobs: usize,
    pub resume: bool,
    pub fresh: bool,
    pub dry_run: bool,
    /// `--slurm` and its options.
    pub slurm: SlurmFlags,
    /// `--collect DIR`: follow a sweep submitted to Slurm before and write its report.
    pub collect: Option<PathBuf>,
}

/// One trial as the sweep planned it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct PlannedTrial {
    index: usize,
    /// The trial's run name, `<sweep>_t<index>`.
    name: String,
    /// `field = value` for each axis.
    changes: Vec<(String, String)>,
    /// SHA-256 of the trial's resolved config.
    config_sha256: String,
}

/// `sweep.spec.json`: what a sweep directory runs, to know whether a rerun is the same sweep.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Spec {
    name: String,
    source: String,
    /// SHA-256 over every trial's resolved config, in order.
    fingerprint: String,
    threads_per_trial: usize,
    trials: Vec<PlannedTrial>,
    /// Each axis with its values described, for the report.
    #[serde(default)]
    axes: Vec<(String, Vec<String>)>,
    #[serde(default)]
    combine: String,
    #[serde(default)]
    random: Option<(usize, u64)>,
}

/// A trial with its config text.
struct Trial {
    planned: PlannedTrial,
    config: String,
}

/// Runs `cargo xtask sweep`. Exit 2 for a bad sweep file or trial config, 1 when a trial failed.
pub fn sweep(file: Option<&Path>, opts: &SweepOptions) -> ExitCode {
    exit_code(run(file, opts))
}

/// A sweep's or search's result as the exit code: its own, or the error said and 2 for bad
/// input ([`ConfigError`]), 1 otherwise.
pub(crate) fn exit_code(result: Result<ExitCode>) -> ExitCode {
    result.unwrap_or_else(|err| {
        eprintln!("error: {err:#}");
        if err.downcast_ref::<ConfigError>().is_some() { ExitCode::from(2) } else { ExitCode::from(1) }
    })
}

fn run(file: Option<&Path>, opts: &SweepOptions) -> Result<ExitCode> {
    let Some(file) = file.filter(|_| opts.collect.is_none()) else {
        let dir = opts.collect.as_deref().expect("clap: a sweep file or --collect");
        return collect(dir);
    };
    let sweep = Sweep::load(file).map_err(ConfigError)?;
    if opts.jobs == 0 {
        return Err(ConfigError("--jobs 0: give at least 1 trial at a time".into()).into());
    }
    let mut slurm = opts.slurm.clone();
    slurm.settings = sweep.slurm.overridden_by(&opts.slurm.settings);
    slurm.settings.validate().map_err(|e| ConfigError(format!("{}: {e}", file.display())))?;
    // On Slurm a trial gets `cpus_per_task` threads (the base config's count when not given);
    // here the machine's cores divided by --jobs.
    let threads = if slurm.slurm {
        let threads = match slurm.settings.cpus_per_task {
            Some(c) => c,
            None => base_plan(&sweep)?.0.threads,
        };
        slurm.settings.cpus_per_task = Some(threads);
        threads
    } else {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / opts.jobs).max(1)
    };
    let trials = plan_trials(&sweep, threads)?;
    let fingerprint = crate::cache::sha256_hex(trials.iter().map(|t| t.config.as_str()).collect::<String>().as_bytes());
    let spec = Spec {
        name: sweep.name.clone(),
        source: file.display().to_string(),
        fingerprint,
        threads_per_trial: threads,
        trials: trials.iter().map(|t| t.planned.clone()).collect(),
        axes: sweep
            .axes
            .iter()
            .map(|a| (a.name(), (0..a.values.len()).map(|i| a.describe_step(i)).collect()))
            .collect(),
        combine: format!("{:?}", sweep.combine).to_lowercase(),
        random: sweep.random,
    };
    if opts.dry_run {
        if slurm.slurm {
            println!(
                "{}: ok — {} trial(s) as one Slurm array, {threads} CPU(s) and thread(s) per task; #SBATCH {}",
                file.display(),
                trials.len(),
                slurm
                    .settings
                    .header_lines()
                    .iter()
                    .map(|l| l.trim_start_matches("#SBATCH "))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        } else {
            println!(
                "{}: ok — {} trial(s), {} thread(s) each at --jobs {}",
                file.display(),
                trials.len(),
                threads,
                opts.jobs
            );
        }
        for t in &trials {
            println!("  {}: {}", t.planned.name, describe(&t.planned));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let dir = sweep_dir(&sweep, &spec, opts)?;
    for sub in ["configs", "trials", "logs"] {
        std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
    }
    shrink_core::io::write_atomic(&dir.join("sweep.spec.json"), serde_json::to_string_pretty(&spec)?.as_bytes())?;
    for t in &trials {
        shrink_core::io::write_atomic(&config_path(&dir, &t.planned), t.config.as_bytes())?;
    }
    let started_utc = crate::report::utc(time::OffsetDateTime::now_utc());
    if slurm.slurm {
        let mut cluster = Cluster::open(&dir, &sweep.name, &opts.cache, &opts.out, &slurm)?;
        let active = cluster.active();
        let submit: Vec<&Trial> =
            trials.iter().filter(|t| finished_run(&dir, t).is_none() && !active.contains(&t.planned.index)).collect();
        eprintln!(
            "sweep {}: {} trial(s), {} finished before, {} still queued or running, {} to submit; {}",
            sweep.name,
            trials.len(),
            trials.iter().filter(|t| finished_run(&dir, t).is_some()).count(),
            active.len(),
            submit.len(),
            dir.display()
        );
        if !submit.is_empty() {
            let indices: Vec<usize> = submit.iter().map(|t| t.planned.index).collect();
            let configs: Vec<PathBuf> = submit.iter().map(|t| config_path(&dir, &t.planned)).collect();
            cluster.submit(&indices, &configs)?;
        }
        let jobs = slurm.settings.parallel.unwrap_or(trials.len());
        let context = ReportContext { spec: &spec, dir: &dir, jobs, started_utc, cluster: Some(&cluster) };
        write_sweep_report(&context, &trials, false)?;
        if slurm.detach {
            println!("{}", dir.display());
            eprintln!("detached; follow it and write its report with: cargo xtask sweep --collect {}", dir.display());
            return Ok(ExitCode::SUCCESS);
        }
        return follow(&context, &trials);
    }
    // A sweep submitted to Slurm before must not run here while its tasks still run there.
    if dir.join("slurm").join("submissions.json").exists()
        && let Ok(cluster) = Cluster::reopen(&dir, &sweep.name)
    {
        let active = cluster.active();
        if !active.is_empty() {
            return Err(ConfigError(format!(
                "{}: {} trial(s) of this sweep are still queued or running on Slurm; follow them with --collect {} (or scancel them) before running it here",
                dir.display(),
                active.len(),
                dir.display()
            ))
            .into());
        }
    }
    let started = Instant::now();
    let mut pending: Vec<&Trial> = trials.iter().filter(|t| finished_run(&dir, t).is_none()).collect();
    let done_before = trials.len() - pending.len();
    eprintln!(
        "sweep {}: {} trial(s), {done_before} finished before, --jobs {} at {threads} thread(s) each; {}",
        sweep.name,
        trials.len(),
        opts.jobs,
        dir.display()
    );
    let context = ReportContext { spec: &spec, dir: &dir, jobs: opts.jobs, started_utc, cluster: None };
    write_sweep_report(&context, &trials, false)?;
    pending.reverse();
    let mut running: Vec<(&Trial, Child, Instant)> = Vec::new();
    let mut finished_now = 0usize;
    let mut failed = 0usize;
    while !pending.is_empty() || !running.is_empty() {
        while running.len() < opts.jobs
            && let Some(t) = pending.pop()
        {
            running.push((t, spawn_trial(&dir, t, opts)?, Instant::now()));
        }
        std::thread::sleep(Duration::from_millis(50));
        let mut i = 0;
        while i < running.len() {
            let Some(status) = running[i].1.try_wait().context("waiting for a trial")? else {
                i += 1;
                continue;
            };
            let (t, _, began) = running.swap_remove(i);
            finished_now += 1;
            let row = finished_run(&dir, t).map(|(run_dir, report)| row_of(t, &run_dir, &report, &dir));
            let remaining = pending.len() + running.len();
            let eta = if remaining == 0 {
                String::new()
            } else {
                let per = started.elapsed().as_secs_f64() / finished_now as f64;
                format!("; ETA {}", minutes(per * remaining as f64))
            };
            let done = trials.len() - remaining;
            match row {
                Some(r) if status.success() => eprintln!(
                    "[{done}/{}] {} {} — {}, {:.0} s{eta}",
                    trials.len(),
                    t.planned.name,
                    describe(&t.planned),
                    r.metrics(),
                    began.elapsed().as_secs_f64()
                ),
                _ => {
                    failed += 1;
                    eprintln!(
                        "[{done}/{}] {} {} — FAILED (exit {}), see {}{eta}",
                        trials.len(),
                        t.planned.name,
                        describe(&t.planned),
                        status.code().map_or("by a signal".into(), |c| c.to_string()),
                        log_path(&dir, &t.planned).display()
                    );
                }
            }
            write_sweep_report(&context, &trials, false)?;
            pause_for_tests(done_before + finished_now);
        }
    }
    write_sweep_report(&context, &trials, true)?;
    println!("{}", dir.display());
    if failed > 0 {
        eprintln!("error: {failed} trial(s) failed; rerun the same command to resume them");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Follows a sweep's trials on Slurm until none is queued or running, rewriting the report as
/// they finish; exit 1 when any failed.
fn follow(cx: &ReportContext<'_>, trials: &[Trial]) -> Result<ExitCode> {
    let cluster = cx.cluster.expect("a sweep on Slurm");
    let indices: Vec<usize> = trials.iter().map(|t| t.planned.index).collect();
    cluster.watch(&indices, || write_sweep_report(cx, trials, false))?;
    write_sweep_report(cx, trials, true)?;
    println!("{}", cx.dir.display());
    let unfinished = trials.iter().filter(|t| finished_run(cx.dir, t).is_none()).count();
    if unfinished > 0 {
        eprintln!(
            "error: {unfinished} trial(s) failed or were cancelled (see report.md); rerun the same command (or --resume) to resubmit only those"
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// `--collect DIR`: a sweep submitted with `--slurm --detach`, followed to its end.
fn collect(dir: &Path) -> Result<ExitCode> {
    let spec_file = dir.join("sweep.spec.json");
    let spec: Spec = serde_json::from_slice(&std::fs::read(&spec_file).map_err(|e| {
        ConfigError(format!("--collect {}: no sweep here ({}: {e})", dir.display(), spec_file.display()))
    })?)
    .map_err(|e| ConfigError(format!("{}: {e}", spec_file.display())))?;
    let trials = spec
        .trials
        .iter()
        .map(|p| {
            let path = config_path(dir, p);
            let config = std::fs::read_to_string(&path).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
            Ok(Trial { planned: p.clone(), config })
        })
        .collect::<Result<Vec<_>>>()?;
    let cluster = Cluster::reopen(dir, &spec.name)?;
    let started_utc = crate::report::utc(time::OffsetDateTime::now_utc());
    let context = ReportContext { spec: &spec, dir, jobs: trials.len(), started_utc, cluster: Some(&cluster) };
    follow(&context, &trials)
}

fn describe(t: &PlannedTrial) -> String {
    t.changes.iter().map(|(f, v)| format!("{f} = {v}")).collect::<Vec<_>>().join(", ")
}

/// A file's text, or nothing when it cannot be read (for fingerprints).
pub(crate) fn file_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

pub(crate) fn minutes(seconds: f64) -> String {
    if seconds < 90.0 { format!("{seconds:.0} s") } else { format!("{:.1} min", seconds / 60.0) }
}

/// Every trial's config: the base with the axes' values, its name, and the sweep's thread count
/// per trial (unless an axis sets `threads`), validated as `xtask run` validates a config.
fn plan_trials(sweep: &Sweep, threads: usize) -> Result<Vec<Trial>> {
    let (base_plan, base_source) = base_plan(sweep)?;
    let base = base_plan.to_toml()?;
    let sets_threads = sweep.axes.iter().any(|a| a.fields.iter().any(|f| f.as_str() == "threads"));
    let mut trials = Vec::new();
    for point in sweep.expand() {
        let name = format!("{}_t{:03}", sweep.name, point.index);
        let mut changes = point.changes.clone();
        changes.push((xtask::sweep::FieldPath::parse("name").expect("a key"), toml::Value::String(name.clone())));
        if !sets_threads {
            changes.push((
                xtask::sweep::FieldPath::parse("threads").expect("a key"),
                toml::Value::Integer(threads as i64),
            ));
        }
        let in_trial = |e: String| {
            ConfigError(format!("{}: trial {} ({}): {e}", sweep.source.display(), point.index, point.describe()))
        };
        let text = xtask::sweep::apply(&base, &changes).map_err(in_trial)?;
        let plan = parse_plan(&text, &base_source).map_err(|e| in_trial(format!("{e:#}")))?;
        let config = plan.to_toml()?;
        trials.push(Trial {
            planned: PlannedTrial {
                index: point.index,
                name,
                changes: point.axes().iter().map(|(f, v)| (f.to_string(), inline(v))).collect(),
                config_sha256: crate::cache::sha256_hex(config.as_bytes()),
            },
            config,
        });
    }
    Ok(trials)
}

/// The sweep's base config, and the file relative paths in it are resolved against.
fn base_plan(sweep: &Sweep) -> Result<(xtask::plan::Plan, PathBuf)> {
    Ok(match &sweep.base {
        Base::File(path) => (load_plan(path)?, path.clone()),
        Base::Inline(text) => (parse_plan(text, &sweep.source)?, sweep.source.clone()),
    })
}

/// The sweep directory to run in: the last one of this sweep when its trials are the same (or
/// `--resume`), a new one otherwise (saying what changed).
fn sweep_dir(sweep: &Sweep, spec: &Spec, opts: &SweepOptions) -> Result<PathBuf> {
    let root = opts.out.join("sweeps").join(&sweep.name);
    let last = (!opts.fresh).then(|| last_sweep(&root)).flatten();
    if let Some((dir, previous)) = last {
        if previous.fingerprint == spec.fingerprint {
            return Ok(dir);
        }
        let changed = what_changed(&previous, spec);
        if opts.resume {
            eprintln!(
                "--resume: continuing {} although {} changed since it began ({changed}); finished trials whose config is unchanged are kept",
                dir.display(),
                sweep.source.display()
            );
            return Ok(dir);
        }
        let new = new_dir(&root)?;
        eprintln!(
            "{} changed since {} began ({changed}): starting a new sweep in {} (--resume continues the old one)",
            sweep.source.display(),
            dir.display(),
            new.display()
        );
        return Ok(new);
    }
    if opts.resume {
        bail!(ConfigError(format!("--resume: no earlier sweep of `{}` under {}", sweep.name, root.display())));
    }
    new_dir(&root)
}

fn last_sweep(root: &Path) -> Option<(PathBuf, Spec)> {
    let mut dirs: Vec<PathBuf> =
        std::fs::read_dir(root).ok()?.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    let dir = dirs.pop()?;
    let spec = serde_json::from_slice(&std::fs::read(dir.join("sweep.spec.json")).ok()?).ok()?;
    Some((dir, spec))
}

pub(crate) fn new_dir(root: &Path) -> Result<PathBuf> {
    let stamp = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!("[year][month][day]T[hour][minute][second]Z"))
        .unwrap_or_else(|_| "sweep".into());
    let mut dir = root.join(&stamp);
    let mut n = 1;
    while dir.exists() {
        n += 1;
        dir = root.join(format!("{stamp}-{n}"));
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// What differs between two sweeps' trials, in a few words.
fn what_changed(old: &Spec, new: &Spec) -> String {
    let mut said = Vec::new();
    for i in 0..old.trials.len().max(new.trials.len()) {
        match (old.trials.get(i), new.trials.get(i)) {
            (Some(a), Some(b)) if a.config_sha256 == b.config_sha256 => {}
            (Some(a), Some(b)) if a.changes != b.changes => {
                said.push(format!("trial {i}: {} → {}", describe(a), describe(b)));
            }
            (Some(_), Some(_)) => {
                said.push(format!("trial {i}: the same axis values over another base config or `set`"))
            }
            (None, Some(b)) => said.push(format!("trial {i} is new ({})", describe(b))),
            (Some(a), None) => said.push(format!("trial {i} is gone ({})", describe(a))),
            (None, None) => {}
        }
    }
    let n = said.len();
    if n > 4 {
        said.truncate(4);
        said.push(format!("and {} more", n - 4));
    }
    said.join("; ")
}

fn config_path(dir: &Path, t: &PlannedTrial) -> PathBuf {
    dir.join("configs").join(format!("{}.toml", t.name))
}

fn log_path(dir: &Path, t: &PlannedTrial) -> PathBuf {
    dir.join("logs").join(format!("{}.log", t.name))
}

/// The trial's complete run of this config, if there is one.
fn finished_run(dir: &Path, t: &Trial) -> Option<(PathBuf, Report)> {
    complete_run(&dir.join("trials").join(&t.planned.name), &t.config)
}

/// A complete run of `config` (its resolved text) among the run directories under `runs`.
pub(crate) fn complete_run(runs: &Path, config: &str) -> Option<(PathBuf, Report)> {
    std::fs::read_dir(runs).ok()?.flatten().map(|e| e.path()).find_map(|run| {
        let report: Report = serde_json::from_slice(&std::fs::read(run.join("report.json")).ok()?).ok()?;
        let resolved = std::fs::read_to_string(run.join("config.resolved.toml")).ok()?;
        (report.status == RunStatus::Complete && resolved == config).then_some((run, report))
    })
}

/// The last run of a trial that is not complete (failed or killed), for the report.
fn unfinished_report(dir: &Path, t: &Trial) -> Option<(PathBuf, Report)> {
    let mut runs: Vec<PathBuf> =
        std::fs::read_dir(dir.join("trials").join(&t.planned.name)).ok()?.flatten().map(|e| e.path()).collect();
    runs.sort();
    let run = runs.pop()?;
    let report: Report = serde_json::from_slice(&std::fs::read(run.join("report.json")).ok()?).ok()?;
    Some((run, report))
}

fn spawn_trial(dir: &Path, t: &Trial, opts: &SweepOptions) -> Result<Child> {
    spawn_run(&dir.join("trials"), &opts.cache, &config_path(dir, &t.planned), &log_path(dir, &t.planned))
        .with_context(|| format!("cannot start trial {}", t.planned.name))
}

/// Starts `xtask run -q --out OUT --cache CACHE CONFIG` with this process's own binary, its
/// output appended to `log_file`; on Linux it dies with this process.
pub(crate) fn spawn_run(out: &Path, cache: &Path, config: &Path, log_file: &Path) -> Result<Child> {
    let exe = own_binary()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file)
        .with_context(|| format!("cannot open {}", log_file.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("run")
        .arg("-q")
        .arg("--out")
        .arg(out)
        .arg("--cache")
        .arg(cache)
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    die_with_parent(&mut cmd);
    Ok(cmd.spawn()?)
}

/// The binary this sweep runs: its trials run the same code even when the file is rebuilt
/// meanwhile (on Linux `/proc/self/exe` is the running image, not the path).
fn own_binary() -> Result<PathBuf> {
    let proc_exe = Path::new("/proc/self/exe");
    if cfg!(target_os = "linux") && proc_exe.exists() {
        return Ok(proc_exe.to_path_buf());
    }
    std::env::current_exe().context("cannot find the xtask binary")
}

/// On Linux a trial is killed when the sweep dies (`PR_SET_PDEATHSIG`), so a killed sweep
/// leaves no trial running on its own; rerunning the sweep resumes it from its checkpoint.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // `pre_exec` is unsafe; the one call below is.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure only calls prctl, which is async-signal-safe,
    // allocates nothing and touches no memory the parent shares.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

/// The kill-and-resume test's hook: with `SHRINK_TEST_STOP_AFTER_TRIALS=n`, the sweep says so
/// and waits to be killed once `n` trials have finished. Not for anything else.
fn pause_for_tests(finished: usize) {
    if std::env::var("SHRINK_TEST_STOP_AFTER_TRIALS").ok().and_then(|v| v.parse::<usize>().ok()) == Some(finished) {
        eprintln!("SHRINK_TEST_STOP_AFTER_TRIALS={finished}: waiting to be killed");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// One trial's row of the sweep report.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Row {
    index: usize,
    name: String,
    changes: Vec<(String, String)>,
    /// `complete`, `failed`, `running` (killed or under way) or `pending`.
    status: String,
    /// Relative to the sweep directory.
    run_dir: Option<String>,
    log: String,
    error: Option<String>,
    /// What the last stage measured (none until the trial is complete).
    #[serde(flatten)]
    measured: Measured,
    /// Sum of the stages' wall times (a cached baseline counts its load).
    wall_seconds: Option<f64>,
    /// The trial's latest Slurm task, on Slurm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    slurm: Option<TaskState>,
    /// On the Pareto front of top-1 against size, b1 latency, MACs.
    front_size: bool,
    front_latency: bool,
    front_macs: bool,
}

impl Row {
    /// A trial with nothing measured yet.
    fn pending(t: &Trial) -> Row {
        Row {
            index: t.planned.index,
            name: t.planned.name.clone(),
            changes: t.planned.changes.clone(),
            status: "pending".into(),
            run_dir: None,
            log: format!("logs/{}.log", t.planned.name),
            error: None,
            measured: Measured::default(),
            wall_seconds: None,
            slurm: None,
            front_size: false,
            front_latency: false,
            front_macs: false,
        }
    }

    fn metrics(&self) -> String {
        let m = &self.measured;
        let mut s = format!(
            "top-1 {:.4} ({}), {:.3} MB",
            m.top1.unwrap_or(f64::NAN),
            m.evaluated_on.as_deref().unwrap_or("-"),
            m.file_bytes.unwrap_or(0) as f64 / 1e6
        );
        if let Some(macs) = m.macs {
            s += &format!(", {:.2} MMACs", macs as f64 / 1e6);
        }
        if let Some(l) = m.latency_b1_ms {
            s += &format!(", b1 {l:.3} ms");
        }
        s
    }
}

/// The measured numbers of a stage: what the row and the baseline show.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Measured {
    /// Top-1 on the test images, computed by `evaluated_on`.
    pub top1: Option<f64>,
    pub evaluated_on: Option<String>,
    /// The model file's bytes.
    pub file_bytes: Option<usize>,
    pub nonzeros: Option<usize>,
    pub macs: Option<u64>,
    /// The runner timed: the one that evaluated when it is a CPU plan, else the f32 CPU plan.
    pub runner: Option<String>,
    pub latency_b1_ms: Option<f64>,
    /// The largest batch measured, and its median.
    pub batch_n: Option<usize>,
    pub latency_bn_ms: Option<f64>,
}

pub(crate) fn measured(st: &crate::report::StageReport) -> Measured {
    let runners: Vec<&str> = st.latency.iter().map(|l| l.runner.as_str()).collect();
    // The runner that evaluated when it is a CPU plan (int8, sparse), else the f32 CPU plan: the
    // deployable kernels, not burn's training backend.
    let evaluated = Some(st.evaluated_on.as_str()).filter(|r| r.starts_with("cpu-plan"));
    let runner = [evaluated, Some("cpu-plan"), Some(st.evaluated_on.as_str())]
        .into_iter()
        .flatten()
        .find(|r| runners.contains(r))
        .or(runners.first().copied())
        .map(str::to_string);
    let of = |batch: usize| {
        st.latency.iter().find(|l| Some(&l.runner) == runner.as_ref() && l.batch_size == batch).map(|l| l.median_ms)
    };
    let batch_n = st.latency.iter().filter(|l| Some(&l.runner) == runner.as_ref()).map(|l| l.batch_size).max();
    Measured {
        top1: st.test.as_ref().map(|t| t.top1),
        evaluated_on: Some(st.evaluated_on.clone()),
        file_bytes: Some(st.file_bytes),
        nonzeros: Some(st.nonzeros),
        macs: Some(st.macs),
        latency_b1_ms: of(1),
        latency_bn_ms: batch_n.filter(|b| *b > 1).and_then(of),
        batch_n: batch_n.filter(|b| *b > 1),
        runner,
    }
}

fn row_of(t: &Trial, run_dir: &Path, report: &Report, sweep_dir: &Path) -> Row {
    Row {
        status: report.status.to_string(),
        run_dir: Some(run_dir.strip_prefix(sweep_dir).unwrap_or(run_dir).display().to_string()),
        error: report.error.clone(),
        measured: report.stages.last().map(measured).unwrap_or_default(),
        wall_seconds: Some(report.stages.iter().map(|s| s.wall_seconds).sum()),
        ..Row::pending(t)
    }
}

/// `sweep.json`.
#[derive(Serialize, Deserialize)]
struct SweepReport {
    name: String,
    source: String,
    status: String,
    started_utc: String,
    updated_utc: String,
    git_revision: String,
    cpu: String,
    jobs: usize,
    threads_per_trial: usize,
    /// `local`, or `slurm` (then `jobs` is the array's `%K`, or its size).
    #[serde(default)]
    scheduler: String,
    /// With `--jobs` above 1, trials ran side by side, so their latencies were measured while
    /// other trials computed: compare them with care.
    latency_measured_concurrently: bool,
    axes: Vec<(String, Vec<String>)>,
    combine: String,
    random: Option<(usize, u64)>,
    /// The trained baseline (stage 0 of the first finished trial, when it trains).
    baseline: Option<Measured>,
    trials: Vec<Row>,
}

struct ReportContext<'a> {
    spec: &'a Spec,
    dir: &'a Path,
    jobs: usize,
    started_utc: String,
    /// The sweep's trials are on Slurm.
    cluster: Option<&'a Cluster>,
}

fn write_sweep_report(cx: &ReportContext<'_>, trials: &[Trial], last: bool) -> Result<()> {
    let mut baseline = None;
    let tasks = cx.cluster.map(Cluster::tasks).unwrap_or_default();
    let mut rows: Vec<Row> = trials
        .iter()
        .map(|t| {
            let task = tasks.get(&t.planned.index).cloned();
            if let Some((run, report)) = finished_run(cx.dir, t) {
                if baseline.is_none() && report.stages.first().is_some_and(|s| s.kind == "train") {
                    baseline = report.stages.first().map(measured);
                }
                return Row { slurm: task, ..row_of(t, &run, &report, cx.dir) };
            }
            let mut row = Row::pending(t);
            if let Some((run, report)) = unfinished_report(cx.dir, t) {
                row.status = report.status.to_string();
                row.error = report.error.clone();
                row.run_dir = Some(run.strip_prefix(cx.dir).unwrap_or(&run).display().to_string());
            }
            if let Some(task) = &task {
                // Slurm knows better than a report a killed task could not finish writing.
                row.status = match (task.active, task.state.as_str()) {
                    (true, "PENDING") => "pending",
                    (true, _) => "running",
                    (false, _) => "failed",
                }
                .into();
            }
            row.slurm = task;
            row
        })
        .collect();
    mark_fronts(&mut rows);
    let complete = rows.iter().all(|r| r.status == "complete");
    let cpu = rows
        .iter()
        .filter_map(|r| r.run_dir.as_ref())
        .find_map(|d| {
            let r: Report = serde_json::from_slice(&std::fs::read(cx.dir.join(d).join("report.json")).ok()?).ok()?;
            Some(r.provenance.cpu)
        })
        .unwrap_or_else(crate::report::cpu_model);
    let report = SweepReport {
        name: cx.spec.name.clone(),
        source: cx.spec.source.clone(),
        status: match (last, complete) {
            (_, true) => "complete",
            (true, false) => "failed",
            (false, false) => "running",
        }
        .into(),
        started_utc: cx.started_utc.clone(),
        updated_utc: crate::report::utc(time::OffsetDateTime::now_utc()),
        git_revision: crate::report::git_revision(),
        cpu,
        jobs: cx.jobs,
        threads_per_trial: cx.spec.threads_per_trial,
        scheduler: if cx.cluster.is_some() { "slurm" } else { "local" }.into(),
        latency_measured_concurrently: cx.jobs > 1,
        axes: cx.spec.axes.clone(),
        combine: cx.spec.combine.clone(),
        random: cx.spec.random,
        baseline,
        trials: rows,
    };
    shrink_core::io::write_atomic(&cx.dir.join("sweep.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    shrink_core::io::write_atomic(&cx.dir.join("report.md"), markdown(&report).as_bytes())?;
    for (k, (file, what, _)) in FRONTS.iter().enumerate() {
        crate::report::charts::write_pareto_chart(&report.name, what, &points(&report, k), &cx.dir.join(file))?;
    }
    Ok(())
}

type Metric = fn(&Measured) -> Option<f64>;

/// The fronts: file, axis label, metric (smaller is better).
const FRONTS: [(&str, &str, Metric); 3] = [
    ("pareto_size.svg", "model file (MB)", |m| m.file_bytes.map(|b| b as f64 / 1e6)),
    ("pareto_latency.svg", "latency at batch 1 (ms)", |m| m.latency_b1_ms),
    ("pareto_macs.svg", "MMACs per image", |m| m.macs.map(|m| m as f64 / 1e6)),
];

/// Marks each complete row on the fronts of top-1 against each cost.
fn mark_fronts(rows: &mut [Row]) {
    let done: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].status == "complete").collect();
    for (k, (_, _, cost)) in FRONTS.iter().enumerate() {
        let points: Vec<Vec<f64>> = done
            .iter()
            .map(|&i| {
                let m = &rows[i].measured;
                vec![m.top1.unwrap_or(f64::NAN), cost(m).unwrap_or(f64::NAN)]
            })
            .collect();
        let front = pareto_front(&points, &[Sense::Maximize, Sense::Minimize]);
        for (&i, on) in done.iter().zip(front) {
            match k {
                0 => rows[i].front_size = on,
                1 => rows[i].front_latency = on,
                _ => rows[i].front_macs = on,
            }
        }
    }
}

/// The chart's points of front `k` of [`FRONTS`]: each complete trial and the baseline.
fn points(report: &SweepReport, k: usize) -> crate::report::charts::ParetoPoints {
    let cost = FRONTS[k].2;
    let trials = report
        .trials
        .iter()
        .filter(|r| r.status == "complete")
        .filter_map(|r| {
            let on = [r.front_size, r.front_latency, r.front_macs][k];
            Some((format!("t{:03}", r.index), cost(&r.measured)?, r.measured.top1?, on))
        })
        .collect();
    let baseline = report.baseline.as_ref().and_then(|b| Some((cost(b)?, b.top1?)));
    crate::report::charts::ParetoPoints { trials, baseline }
}

fn markdown(r: &SweepReport) -> String {
    let mut s = format!("# Sweep {} — {}\n\n", r.name, r.status);
    s += &format!(
        "- sweep file: `{}`; {} trial(s) ({}{}); git {}; CPU {}\n- {} at {} thread(s) per trial; started {}, updated {}\n",
        r.source,
        r.trials.len(),
        r.combine,
        r.random.map(|(n, seed)| format!(", random {n} with seed {seed}")).unwrap_or_default(),
        r.git_revision,
        r.cpu,
        if r.scheduler == "slurm" {
            format!("Slurm job array, at most {} task(s) at once", r.jobs)
        } else {
            format!("--jobs {}", r.jobs)
        },
        r.threads_per_trial,
        r.started_utc,
        r.updated_utc
    );
    if r.latency_measured_concurrently {
        s += "- latencies were measured while other trials may have run beside them: they show the trend, not the speed alone; rerun a trial alone to time it\n";
    }
    for (field, values) in &r.axes {
        s += &format!("- axis `{field}`: {}\n", values.join(", "));
    }
    if let Some(b) = &r.baseline {
        s += &format!(
            "- baseline (the trained model before compression, {}): top-1 {:.4}, {:.3} MB, {:.2} MMACs{}\n",
            b.evaluated_on.as_deref().unwrap_or("-"),
            b.top1.unwrap_or(f64::NAN),
            b.file_bytes.unwrap_or(0) as f64 / 1e6,
            b.macs.unwrap_or(0) as f64 / 1e6,
            b.latency_b1_ms
                .map(|l| format!(", b1 {l:.3} ms ({})", b.runner.as_deref().unwrap_or("-")))
                .unwrap_or_default()
        );
    }
    s += "\nFront columns: ● on the Pareto front of top-1 against that cost (no other trial is as accurate and cheaper).\n\n";
    s += "| trial | changes | status | top-1 | on | size MB | nonzeros | MMACs | runner | b1 ms | bN ms | wall s | size | latency | MACs |\n";
    s += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    let num = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    let mark = |on: bool| if on { "●" } else { "" };
    for t in &r.trials {
        let changes = t.changes.iter().map(|(f, v)| format!("`{f}` = {v}")).collect::<Vec<_>>().join(", ");
        let mut status = match &t.error {
            Some(e) => format!("{} ({}; log `{}`)", t.status, e.lines().next().unwrap_or(""), t.log),
            None => t.status.clone(),
        };
        if let Some(task) = &t.slurm {
            status += &format!(
                " · Slurm {} {}{}{}",
                task.job,
                task.state,
                task.node.as_ref().map(|n| format!(" on {n}")).unwrap_or_default(),
                if task.state == "COMPLETED" { String::new() } else { format!(", `{}`", task.log) }
            );
        }
        s += &format!(
            "| {} | {changes} | {status} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            t.index,
            num(t.measured.top1, 4),
            t.measured.evaluated_on.as_deref().unwrap_or("-"),
            num(t.measured.file_bytes.map(|b| b as f64 / 1e6), 3),
            t.measured.nonzeros.map_or("-".into(), |n| n.to_string()),
            num(t.measured.macs.map(|m| m as f64 / 1e6), 2),
            t.measured.runner.as_deref().unwrap_or("-"),
            num(t.measured.latency_b1_ms, 3),
            match (t.measured.batch_n, t.measured.latency_bn_ms) {
                (Some(b), Some(l)) => format!("{l:.2} (b{b})"),
                _ => "-".into(),
            },
            num(t.wall_seconds, 0),
            mark(t.front_size),
            mark(t.front_latency),
            mark(t.front_macs),
        );
    }
    s += "\nCharts: `pareto_size.svg`, `pareto_latency.svg`, `pareto_macs.svg`. Each trial's own report is in its run directory (`trials/`).\n";
    s
}
