//! Trials on Slurm: what `sweep --slurm` and `search --slurm` submit, and how they follow it.
//!
//! A sweep directory run through Slurm holds, besides what a local sweep writes:
//! - `slurm/trial.sh`: the array's batch script; task `i` runs trial `<name>_t<i>` — the same
//!   `xtask run` a local sweep starts, with the same `--out` and `--cache` — and writes
//!   `slurm/tasks/<trial>.start` and `.exit`;
//! - `slurm/prepare.sh`: the job the array depends on (`--dependency=afterok`); it trains the
//!   shared baselines and teachers once (`xtask prepare`) and writes `slurm/prepared_<job>.json`
//!   from its node, which shows that the node can write the sweep directory;
//! - `slurm/submissions.json`: every job submitted, with the binary, the cache and the options;
//! - `logs/slurm/`: Slurm's own output of each job and task (`<array>_<task>.out`).
//!
//! The state of a task comes from `scontrol -o show job` while Slurm lists it, then from the
//! files the task wrote: never from `sacct`, which needs accounting (`slurmdbd`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use xtask::config::ConfigError;
use xtask::slurm::{JobRecord, SlurmSettings, array_spec, parse_job_id, parse_scontrol};

/// `--slurm` and the options that go with it, from the command line.
#[derive(Clone, Debug, Default)]
pub struct SlurmFlags {
    pub slurm: bool,
    /// Submit and return; `--collect DIR` follows the sweep later.
    pub detach: bool,
    /// The binary the tasks run (default: this one, copied next to the sweeps).
    pub binary: Option<PathBuf>,
    pub settings: SlurmSettings,
}

/// One submitted job: the preparation job, or an array of trials.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Submission {
    /// `prepare` or `trials`.
    kind: String,
    job_id: u64,
    /// The trials' indices (the array's task ids); empty for `prepare`.
    indices: Vec<usize>,
    /// The job it waits for (`--dependency=afterok`).
    after: Option<u64>,
    submitted_utc: String,
}

/// `slurm/submissions.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Ledger {
    binary: PathBuf,
    cache: PathBuf,
    workdir: PathBuf,
    settings: SlurmSettings,
    submissions: Vec<Submission>,
}

/// What Slurm (or the task's own files) says about one trial's latest task.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TaskState {
    /// `<array job>_<index>`.
    pub job: String,
    /// Slurm's state (`PENDING`, `RUNNING`, `COMPLETED`, `CANCELLED`, `TIMEOUT`, `NODE_FAIL`, …),
    /// or what the task's files say once Slurm no longer lists it (`EXITED <code>`, `ENDED`).
    pub state: String,
    /// Why it waits, while pending.
    pub reason: Option<String>,
    pub node: Option<String>,
    /// Slurm's output of the task, relative to the sweep directory.
    pub log: String,
    /// Still pending or running.
    pub active: bool,
}

/// A sweep's or search's trials on Slurm.
pub struct Cluster {
    dir: PathBuf,
    /// Trials are `<name>_t<index>`.
    name: String,
    ledger: Ledger,
    /// Since when a preparation job that exited 0 has shown no mark here.
    mark_missing_since: std::cell::Cell<Option<Instant>>,
}

/// How long a mark written on another node may take to show here: a shared filesystem (NFS)
/// caches directory attributes for up to a minute by default.
const MARK_GRACE: Duration = Duration::from_secs(60);

const POLL: Duration = Duration::from_secs(2);

impl Cluster {
    /// Slurm for the sweep or search in `dir` (its trials named `<name>_t<index>`), with these
    /// options: checks that Slurm's commands are here, places the binary the tasks run and
    /// writes the batch scripts.
    ///
    /// # Errors
    /// No `sbatch`/`scontrol` ([`ConfigError`]), paths Slurm scripts cannot quote, a binary
    /// that cannot be copied.
    pub fn open(dir: &Path, name: &str, cache: &Path, binary_root: &Path, flags: &SlurmFlags) -> Result<Cluster> {
        require_slurm()?;
        let dir = absolute(dir)?;
        let cache = absolute(cache)?;
        let workdir = std::env::current_dir().context("the current directory")?;
        flags.settings.validate().map_err(|e| ConfigError(format!("--slurm options: {e}")))?;
        let binary = match &flags.binary {
            Some(b) => {
                let b = absolute(b)?;
                if !b.is_file() {
                    bail!(ConfigError(format!("--binary {}: no such file", b.display())));
                }
                b
            }
            None => place_own_binary(&absolute(binary_root)?)?,
        };
        for p in [&dir, &cache, &workdir, &binary] {
            quoted(p)?;
        }
        let ledger = Ledger { binary, cache, workdir, settings: flags.settings.clone(), submissions: Vec::new() };
        let mut cluster = Cluster { dir, name: name.into(), ledger, mark_missing_since: Default::default() };
        if let Some(previous) = read_ledger(&cluster.dir)? {
            cluster.ledger.submissions = previous.submissions;
        }
        for sub in ["slurm/tasks", "logs/slurm"] {
            let p = cluster.dir.join(sub);
            std::fs::create_dir_all(&p).with_context(|| format!("cannot create {}", p.display()))?;
        }
        cluster.write_scripts()?;
        cluster.save()?;
        Ok(cluster)
    }

    /// The Slurm state of a directory submitted before (`--collect`), with the options it was
    /// submitted with.
    ///
    /// # Errors
    /// The directory was never run with `--slurm` ([`ConfigError`]), or Slurm is missing.
    pub fn reopen(dir: &Path, name: &str) -> Result<Cluster> {
        require_slurm()?;
        let dir = absolute(dir)?;
        let ledger = read_ledger(&dir)?.ok_or_else(|| {
            ConfigError(format!(
                "{}: no slurm/submissions.json — this directory was not run with --slurm",
                dir.display()
            ))
        })?;
        Ok(Cluster { dir, name: name.into(), ledger, mark_missing_since: Default::default() })
    }

    fn save(&self) -> Result<()> {
        shrink_core::io::write_atomic(&ledger_path(&self.dir), serde_json::to_string_pretty(&self.ledger)?.as_bytes())?;
        Ok(())
    }

    fn script(&self, kind: &str) -> PathBuf {
        self.dir.join("slurm").join(format!("{kind}.sh"))
    }

    /// Task `i` of the array runs trial `<name>_t<i>`; a job runs `xtask prepare` on the configs
    /// it is given as arguments.
    fn write_scripts(&self) -> Result<()> {
        let l = &self.ledger;
        let (dir, bin, cache) = (quoted(&self.dir)?, quoted(&l.binary)?, quoted(&l.cache)?);
        let header = |job: &str, output: &str| {
            let mut s = format!(
                "#!/bin/bash\n# Written by cargo xtask for {}; submitted with sbatch (see slurm/submissions.json).\n#SBATCH --job-name={job}\n#SBATCH --output={}/logs/slurm/{output}\n#SBATCH --chdir={}\n",
                self.dir.display(),
                self.dir.display(),
                l.workdir.display()
            );
            for line in l.settings.header_lines() {
                s += &line;
                s.push('\n');
            }
            s
        };
        let trial = header(&format!("shrink-{}", self.name), "%A_%a.out")
            + &format!(
                r#"set -u
dir={dir}
i=${{SLURM_ARRAY_TASK_ID:?this script is task i of a job array}}
name=$(printf '%s_t%03d' '{name}' "$i")
echo "job ${{SLURM_ARRAY_JOB_ID}}_$i on $(hostname) at $(date -u +%Y-%m-%dT%H:%M:%S.%NZ)" > "$dir/slurm/tasks/$name.start"
{bin} run -q --out "$dir/trials" --cache {cache} "$dir/configs/$name.toml" >> "$dir/logs/$name.log" 2>&1
code=$?
echo "$code" > "$dir/slurm/tasks/$name.exit"
exit "$code"
"#,
                name = self.name
            );
        let prepare = header(&format!("shrink-{}-prepare", self.name), "prepare_%j.out")
            + &format!(
                r#"set -u
dir={dir}
{bin} prepare -q --cache {cache} --mark "$dir/slurm/prepared_${{SLURM_JOB_ID}}.json" "$@"
"#
            );
        for (kind, text) in [("trial", trial), ("prepare", prepare)] {
            shrink_core::io::write_atomic(&self.script(kind), text.as_bytes())?;
        }
        Ok(())
    }

    fn sbatch(&self, args: &[String]) -> Result<u64> {
        let out = Command::new("sbatch").arg("--parsable").args(args).output().context("cannot run sbatch")?;
        if !out.status.success() {
            bail!("sbatch {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        parse_job_id(&stdout).with_context(|| format!("sbatch printed no job id: {stdout:?}"))
    }

    fn record(&mut self, kind: &str, job_id: u64, indices: Vec<usize>, after: Option<u64>) -> Result<()> {
        let submitted_utc = crate::report::utc(time::OffsetDateTime::now_utc());
        self.ledger.submissions.push(Submission { kind: kind.into(), job_id, indices, after, submitted_utc });
        self.save()
    }

    /// Submits the trials `indices` (as one array) after a preparation job that trains what
    /// their configs share; returns the array's job id.
    ///
    /// # Errors
    /// `sbatch` refuses a job.
    pub fn submit(&mut self, indices: &[usize], configs: &[PathBuf]) -> Result<u64> {
        for i in indices {
            let _ = std::fs::remove_file(self.task_file(*i, "exit"));
            let _ = std::fs::remove_file(self.task_file(*i, "start"));
        }
        let mut args = vec![self.script("prepare").display().to_string()];
        args.extend(configs.iter().map(|c| c.display().to_string()));
        let prepare = self.sbatch(&args)?;
        self.record("prepare", prepare, Vec::new(), None)?;
        let array = self.sbatch(&[
            format!("--array={}", array_spec(indices, self.ledger.settings.parallel)),
            format!("--dependency=afterok:{prepare}"),
            self.script("trial").display().to_string(),
        ])?;
        self.record("trials", array, indices.to_vec(), Some(prepare))?;
        eprintln!(
            "submitted job {prepare} (trains the shared baseline) and array {array} of {} trial(s) after it",
            indices.len()
        );
        Ok(array)
    }

    fn task_file(&self, index: usize, ext: &str) -> PathBuf {
        self.dir.join("slurm").join("tasks").join(format!("{}_t{index:03}.{ext}", self.name))
    }

    /// What `scontrol` lists of every job submitted (jobs it no longer knows are absent).
    fn records(&self) -> BTreeMap<u64, Vec<JobRecord>> {
        let mut out = BTreeMap::new();
        for s in &self.ledger.submissions {
            let Ok(o) = Command::new("scontrol").args(["-o", "show", "job", &s.job_id.to_string()]).output() else {
                continue;
            };
            // An id Slurm has forgotten: "Invalid job id specified", exit 1.
            out.insert(s.job_id, parse_scontrol(&String::from_utf8_lossy(&o.stdout)));
        }
        out
    }

    /// Each submitted trial's latest task, as Slurm or its files say.
    pub fn tasks(&self) -> BTreeMap<usize, TaskState> {
        let records = self.records();
        let mut out = BTreeMap::new();
        for s in self.ledger.submissions.iter().filter(|s| s.kind == "trials") {
            for &i in &s.indices {
                let record = records
                    .get(&s.job_id)
                    .and_then(|rs| rs.iter().find(|r| r.array_job_id == Some(s.job_id) && r.tasks.contains(&i)));
                let mut t = TaskState {
                    job: format!("{}_{i}", s.job_id),
                    log: format!("logs/slurm/{}_{i}.out", s.job_id),
                    ..TaskState::default()
                };
                match record {
                    Some(r) => {
                        t.state = r.state.0.clone();
                        t.active = r.state.is_active();
                        t.reason = (r.state.is_pending() && r.reason != "None").then(|| r.reason.clone());
                        t.node = r.node.clone().filter(|_| !r.state.is_pending());
                    }
                    None => {
                        t.state = match std::fs::read_to_string(self.task_file(i, "exit")).ok() {
                            Some(code) => format!("EXITED {}", code.trim()),
                            None => "ENDED (Slurm no longer lists it and it left no exit code: cancelled, timed out or its node failed)"
                                .into(),
                        };
                    }
                }
                out.insert(i, t);
            }
        }
        out
    }

    /// Indices of trials whose latest task is still pending or running.
    pub fn active(&self) -> Vec<usize> {
        self.tasks().into_iter().filter(|(_, t)| t.active).map(|(i, _)| i).collect()
    }

    /// Why the last preparation job keeps the trials from running, if it does: it failed, or
    /// it ended without its mark in the sweep directory (the directory is not shared with the
    /// node: a [`ConfigError`], since `--out` must change). `None` while it is pending or
    /// running, or when it did its work.
    pub fn preparation_problem(&self) -> Option<anyhow::Error> {
        let prep = self.ledger.submissions.iter().rev().find(|s| s.kind == "prepare")?;
        let records = Command::new("scontrol")
            .args(["-o", "show", "job", &prep.job_id.to_string()])
            .output()
            .map(|o| parse_scontrol(&String::from_utf8_lossy(&o.stdout)))
            .unwrap_or_default();
        let state = records.first().map(|r| r.state.clone());
        if state.as_ref().is_some_and(|s| s.is_active()) {
            return None;
        }
        let mark = self.dir.join("slurm").join(format!("prepared_{}.json", prep.job_id));
        if mark.exists() {
            return None;
        }
        if state.as_ref().is_none_or(|s| s.0 == "COMPLETED") {
            // It exited 0, so it wrote its mark where it runs; give a shared filesystem time
            // to show it here.
            let since = self.mark_missing_since.get().unwrap_or_else(Instant::now);
            self.mark_missing_since.set(Some(since));
            if since.elapsed() < MARK_GRACE {
                return None;
            }
        }
        let output = self.dir.join("logs").join("slurm").join(format!("prepare_{}.out", prep.job_id));
        let state = state.map_or_else(|| "ended".to_string(), |s| s.0);
        let node = records.first().and_then(|r| r.node.clone()).unwrap_or_else(|| "its node".into());
        Some(if output.exists() {
            anyhow::anyhow!(
                "the preparation job {} (training the shared baseline) is {state} without finishing; see {}",
                prep.job_id,
                output.display()
            )
        } else {
            ConfigError(format!(
                "the preparation job {} ({state} on {node}) left nothing in {}: the sweep directory must be on a filesystem the nodes share and can write (put --out there), with the binary ({}) and the data readable from them",
                prep.job_id,
                self.dir.display(),
                self.ledger.binary.display()
            ))
            .into()
        })
    }

    /// Cancels every task of these trials' latest arrays that is still pending or running.
    pub fn cancel_active(&self) {
        for (_, t) in self.tasks().into_iter().filter(|(_, t)| t.active) {
            let _ = Command::new("scancel").arg(&t.job).status();
        }
    }

    /// Waits until none of `indices` is pending or running, with a progress line when the
    /// counts change; `on_finished` runs after each trial that finished (or failed) meanwhile.
    ///
    /// # Errors
    /// The preparation job failed or could not write the sweep directory (its dependants are
    /// cancelled), or `on_finished` failed.
    pub fn watch(&self, indices: &[usize], mut on_finished: impl FnMut() -> Result<()>) -> Result<()> {
        let started = Instant::now();
        let mut said = String::new();
        let mut last_active: Option<Vec<usize>> = None;
        loop {
            let tasks = self.tasks();
            let mine: Vec<(&usize, &TaskState)> = tasks.iter().filter(|(i, _)| indices.contains(i)).collect();
            let pending = mine.iter().filter(|(_, t)| t.active && t.state == "PENDING").count();
            let running = mine.iter().filter(|(_, t)| t.active).count() - pending;
            let failed = mine.iter().filter(|(_, t)| !t.active && t.state != "COMPLETED").count();
            let done = mine.len() - pending - running - failed;
            let active: Vec<usize> = mine.iter().filter(|(_, t)| t.active).map(|(i, _)| **i).collect();
            if last_active.as_ref().is_some_and(|a| a.len() > active.len()) {
                on_finished()?;
            }
            let line = format!("slurm: {pending} pending, {running} running, {done} done, {failed} failed");
            if line != said {
                eprintln!("{line} ({})", crate::sweep_run::minutes(started.elapsed().as_secs_f64()));
                said = line;
            }
            if active.is_empty() {
                on_finished()?;
                return Ok(());
            }
            if let Some(problem) = self.preparation_problem() {
                self.cancel_active();
                return Err(problem);
            }
            last_active = Some(active);
            std::thread::sleep(POLL);
        }
    }
}

fn ledger_path(dir: &Path) -> PathBuf {
    dir.join("slurm").join("submissions.json")
}

/// `slurm/submissions.json` of the sweep or search in `dir`, if it was ever submitted.
fn read_ledger(dir: &Path) -> Result<Option<Ledger>> {
    let path = ledger_path(dir);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `path` made absolute against the current directory (Slurm's tasks start elsewhere).
fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot make {} absolute", path.display()))
}

/// `path` in single quotes for the batch scripts; a path with a quote or a newline is refused.
fn quoted(path: &Path) -> Result<String> {
    let s = path.to_str().with_context(|| format!("{}: not UTF-8", path.display()))?;
    if s.contains(['\'', '\n', '\r']) {
        bail!(ConfigError(format!("{s}: a path for Slurm's scripts cannot hold a quote or a newline")));
    }
    Ok(format!("'{s}'"))
}

fn require_slurm() -> Result<()> {
    for tool in ["sbatch", "scontrol", "scancel"] {
        let found =
            std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()));
        if !found {
            bail!(ConfigError(format!(
                "--slurm: `{tool}` is not on PATH; run on a machine where Slurm's commands are (a login node), or drop --slurm to run here"
            )));
        }
    }
    Ok(())
}

/// This process's binary, copied once under `root/bin/` by its SHA-256: the tasks run exactly
/// this image, even when `target/` is rebuilt while they wait in the queue.
fn place_own_binary(root: &Path) -> Result<PathBuf> {
    let exe = std::fs::read("/proc/self/exe")
        .or_else(|_| std::fs::read(std::env::current_exe()?))
        .context("cannot read this binary")?;
    let sha = crate::cache::sha256_hex(&exe);
    let dir = root.join("bin");
    let path = dir.join(format!("xtask-{}", &sha[..16]));
    // Written whole (atomically) under its own SHA-256: a file of this length there is this image.
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == exe.len() as u64) {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    shrink_core::io::write_atomic(&path, &exe)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot make {} executable", path.display()))?;
    }
    eprintln!("the tasks run {} (this binary)", path.display());
    Ok(path)
}
