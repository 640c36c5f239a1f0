//! `cargo xtask search`: runs an accuracy-driven search ([`xtask::search`]) with each trial an
//! ordinary run (a child `xtask run`, as a sweep's trials), one after the other.
//!
//! The search directory, `<out>/searches/<name>/<timestamp>/`, holds `configs/`, `trials/`,
//! `logs/`, and after every trial `search.json`, `report.md` and `best/` — the best model found
//! so far (model file, its report and config), replaced atomically — so a timeout or a kill
//! leaves the best answer on disk. Running the same command again continues the same directory:
//! the strategy is deterministic, so the trials already finished are read back instead of run
//! again, and the search goes on from there.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use xtask::config::{ConfigError, load_plan, parse_plan};
use xtask::search::{Objective, Outcome, Proposal, Search, Stop, Strategy, best};
use xtask::sweep::{Base, FieldPath, apply, inline};

use crate::report::Report;
use crate::sweep_run::{Measured, complete_run, measured, minutes, new_dir, spawn_run};

/// Options from the command line.
pub struct SearchOptions {
    pub out: PathBuf,
    pub cache: PathBuf,
    pub fresh: bool,
    pub dry_run: bool,
    /// `--slurm`: each trial a job on Slurm, followed to its end.
    pub slurm: crate::slurm_run::SlurmFlags,
}

/// One trial's row in `search.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Row {
    index: usize,
    name: String,
    why: String,
    /// The strategy's fields, `field = value` (the widths as overrides, or the prune budget).
    changes: Vec<(String, String)>,
    /// Relative to the search directory.
    run_dir: String,
    /// Validation top-1 of the model before the searched stage, and of the result.
    reference: f64,
    validation_top1: f64,
    /// Within the tolerance.
    holds: bool,
    /// The objective's value (smaller is better).
    cost: f64,
    /// What the trial's last stage measured (test top-1 included, never used to decide).
    measured: Measured,
    wall_seconds: f64,
    /// The trial's Slurm job, on Slurm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    slurm: Option<crate::slurm_run::TaskState>,
}

/// `search.json`.
#[derive(Serialize, Deserialize)]
struct SearchReport {
    name: String,
    source: String,
    /// `running`, or why it stopped: `finished`, `max_trials`, `timeout`, `failed`.
    status: String,
    objective: Objective,
    tolerance: String,
    max_trials: usize,
    timeout_minutes: Option<f64>,
    started_utc: String,
    updated_utc: String,
    elapsed_seconds: f64,
    git_revision: String,
    cpu: String,
    /// Index of the best trial within the tolerance, and why it won.
    best: Option<usize>,
    verdict: String,
    trials: Vec<Row>,
}

/// Runs `cargo xtask search`. Exit 2 for a bad search file or trial config, 1 when a trial
/// failed (the best model so far is kept).
pub fn search(file: &Path, opts: &SearchOptions) -> ExitCode {
    crate::sweep_run::exit_code(run(file, opts))
}

/// The searched stage, checked against the base plan.
fn checked_stage(s: &Search, plan: &xtask::plan::Plan) -> Result<usize, String> {
    let (stage, kind) = match &s.strategy {
        Strategy::Quantize { stage, .. } => (*stage, "quantize"),
        Strategy::Prune { stage, .. } => (*stage, "prune"),
    };
    let key = format!("key `{kind}.stage`");
    let Some(st) = plan.stages.get(stage) else {
        return Err(format!(
            "{key}: the base config has {} stages (0 to {})",
            plan.stages.len(),
            plan.stages.len().max(1) - 1
        ));
    };
    if st.kind() != kind {
        return Err(format!("{key}: stage {stage} of the base config is a {} stage, not {kind}", st.kind()));
    }
    if stage == 0 {
        return Err(format!("{key}: the searched stage needs a stage before it, whose model is the reference"));
    }
    Ok(stage)
}

fn run(file: &Path, opts: &SearchOptions) -> Result<ExitCode> {
    let s = Search::load(file).map_err(ConfigError)?;
    let (base_plan, base_source) = match &s.base {
        Base::File(path) => (load_plan(path)?, path.clone()),
        Base::Inline(text) => (parse_plan(text, &s.source)?, s.source.clone()),
    };
    let base = base_plan.to_toml()?;
    let mut slurm = opts.slurm.clone();
    slurm.settings = s.slurm.overridden_by(&opts.slurm.settings);
    slurm.settings.validate().map_err(|e| ConfigError(format!("{}: {e}", file.display())))?;
    if slurm.detach {
        return Err(ConfigError(
            "--detach: a search chooses each trial from the ones before, so it follows its trials on Slurm and cannot detach"
                .into(),
        )
        .into());
    }
    // On Slurm a trial runs with `cpus_per_task` threads when it is given.
    let threads = slurm.settings.cpus_per_task.filter(|_| slurm.slurm);
    // The trial's config: the base, `set`, the strategy's changes, the trial's name.
    let config_of = |changes: &[(FieldPath, toml::Value)], name: &str| -> Result<(xtask::plan::Plan, String)> {
        let mut all: Vec<(FieldPath, toml::Value)> = s.set.clone();
        if let Some(t) = threads {
            all.push((FieldPath::parse("threads").expect("a key"), toml::Value::Integer(t as i64)));
        }
        all.extend(changes.iter().cloned());
        all.push((FieldPath::parse("name").expect("a key"), toml::Value::String(name.into())));
        let fail = |e: String| ConfigError(format!("{}: trial {name}: {e}", s.source.display()));
        let text = apply(&base, &all).map_err(fail)?;
        let plan = parse_plan(&text, &base_source).map_err(|e| fail(format!("{e:#}")))?;
        let config = plan.to_toml()?;
        Ok((plan, config))
    };
    // Check the first trial's config (the strategy's stage, the validation split) before
    // anything runs.
    let probe_changes = match &s.strategy {
        Strategy::Quantize { stage, bits } => xtask::search::quantize_changes(*stage, bits, &[], true),
        Strategy::Prune { stage, max_drop } => vec![(
            FieldPath::parse(&format!("stages[{stage}].sensitivity_max_drop")).expect("a key"),
            toml::Value::Float(max_drop[0]),
        )],
    };
    let stage = checked_stage(&s, &base_plan).map_err(|e| ConfigError(format!("{}: {e}", file.display())))?;
    let (probe, _) = config_of(&probe_changes, &format!("{}_t000", s.name))?;
    if probe.data.validation_fraction <= 0.0 {
        return Err(ConfigError(format!(
            "{}: a search decides on validation top-1, and the base config has no validation split: set `data.validation_fraction` (in the base or in `set`)",
            file.display()
        ))
        .into());
    }
    if opts.dry_run {
        println!(
            "{}: ok — {} strategy on stage {stage} of {}, objective {:?}, tolerance {}, at most {} trial(s){}",
            file.display(),
            probe.stages[stage].kind(),
            base_source.display(),
            s.objective,
            s.tolerance.describe(),
            s.max_trials,
            s.timeout_minutes.map(|m| format!(" or {m} minutes")).unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let fingerprint = crate::cache::sha256_hex(format!("{}\n{}", crate::sweep_run::file_text(file), base).as_bytes());
    let root = opts.out.join("searches").join(&s.name);
    let dir = match (!opts.fresh).then(|| last_search(&root, &fingerprint)).flatten() {
        Some(dir) => dir,
        None => new_dir(&root)?,
    };
    for sub in ["configs", "trials", "logs"] {
        std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
    }
    shrink_core::io::write_atomic(&dir.join("fingerprint"), fingerprint.as_bytes())?;
    eprintln!(
        "search {}: {} (objective {:?}, tolerance {})",
        s.name,
        dir.display(),
        s.objective,
        s.tolerance.describe()
    );

    let mut cluster = match slurm.slurm {
        true => {
            if slurm.settings.cpus_per_task.is_none() {
                slurm.settings.cpus_per_task = Some(probe.threads);
            }
            Some(crate::slurm_run::Cluster::open(&dir, &s.name, &opts.cache, &opts.out, &slurm)?)
        }
        false => None,
    };
    let started = Instant::now();
    let started_utc = crate::report::utc(time::OffsetDateTime::now_utc());
    let mut rows: Vec<Row> = Vec::new();
    let mut outcomes: Vec<Option<Outcome>> = Vec::new();
    let mut timed_out = false;
    let mut best_so_far: Option<usize> = None;
    let mut evaluate = |p: &Proposal| -> Result<Option<Outcome>, String> {
        if rows.len() >= s.max_trials {
            return Ok(None);
        }
        if s.timeout_minutes.is_some_and(|m| started.elapsed().as_secs_f64() > m * 60.0) {
            timed_out = true;
            return Ok(None);
        }
        let index = rows.len();
        let name = format!("{}_t{index:03}", s.name);
        let (_, config) = config_of(&p.changes, &name).map_err(|e| format!("{e:#}"))?;
        let config_file = dir.join("configs").join(format!("{name}.toml"));
        shrink_core::io::write_atomic(&config_file, config.as_bytes()).map_err(|e| format!("{e:#}"))?;
        let runs = dir.join("trials").join(&name);
        let began = Instant::now();
        let (run_dir, report) = match complete_run(&runs, &config) {
            Some(done) => done,
            None => {
                let log = dir.join("logs").join(format!("{name}.log"));
                let status = match cluster.as_mut() {
                    Some(c) => on_slurm(c, index, &config_file),
                    None => spawn_run(&dir.join("trials"), &opts.cache, &config_file, &log)
                        .and_then(|mut c| Ok(c.wait()?))
                        .map(|status| (status.success(), status.to_string())),
                }
                .map_err(|e| format!("trial {name}: {e:#}"))?;
                match complete_run(&runs, &config) {
                    Some(done) if status.0 => done,
                    _ => {
                        return Err(format!("trial {name} failed ({}); see {}", status.1, log.display()));
                    }
                }
            }
        };
        let outcome = outcome_of(&report, stage, s.objective, p.wants_sensitivity)
            .ok_or_else(|| format!("trial {name}: its report lacks validation top-1 or the objective's value"))?;
        let holds = s.tolerance.holds(outcome.reference, outcome.accuracy);
        let last = report.stages.last().map(measured).unwrap_or_default();
        rows.push(Row {
            index,
            name: name.clone(),
            why: p.why.clone(),
            changes: p
                .changes
                .iter()
                .filter(|(f, _)| !f.as_str().ends_with(".sensitivity"))
                .map(|(f, v)| (f.to_string(), inline(v)))
                .collect(),
            run_dir: run_dir.strip_prefix(&dir).unwrap_or(&run_dir).display().to_string(),
            reference: outcome.reference,
            validation_top1: outcome.accuracy,
            holds,
            cost: outcome.cost,
            measured: last,
            wall_seconds: report.stages.iter().map(|st| st.wall_seconds).sum(),
            slurm: cluster.as_ref().and_then(|c| c.tasks().remove(&index)),
        });
        outcomes.push(Some(outcome.clone()));
        let winner = best(&outcomes, s.tolerance);
        if winner != best_so_far
            && let Some(w) = winner
        {
            write_best(&dir, &dir.join(&rows[w].run_dir), &dir.join("configs").join(format!("{}.toml", rows[w].name)))
                .map_err(|e| format!("{e:#}"))?;
            best_so_far = winner;
        }
        let r = &rows[index];
        eprintln!(
            "[{}] {name} {} — validation top-1 {:.4} (reference {:.4}, {:+.2} pp) {}; {} {}; best {}; {:.0} s, {} in all",
            index + 1,
            r.why,
            r.validation_top1,
            r.reference,
            (r.validation_top1 - r.reference) * 100.0,
            if holds { "holds" } else { "fails" },
            objective_name(s.objective),
            cost_text(s.objective, r.cost),
            best_so_far.map_or("none yet".to_string(), |b| rows[b].name.clone()),
            began.elapsed().as_secs_f64(),
            minutes(started.elapsed().as_secs_f64()),
        );
        write_report(&s, file, &dir, &rows, best_so_far, "running", &started_utc, started)
            .map_err(|e| format!("{e:#}"))?;
        Ok(Some(outcome))
    };
    let result = xtask::search::run(&s, &mut evaluate);
    let status = match (&result, timed_out) {
        (Err(_), _) => "failed",
        (Ok(_), true) => "timeout",
        (Ok(Stop::MaxTrials), false) => "max_trials",
        (Ok(_), false) => "finished",
    };
    let final_best = best(&outcomes, s.tolerance);
    write_report(&s, file, &dir, &rows, final_best, status, &started_utc, started)?;
    println!("{}", dir.display());
    match result {
        Err(e) => {
            eprintln!("error: {e}; the best model so far is in {}", dir.join("best").display());
            Ok(ExitCode::from(1))
        }
        Ok(_) => {
            eprintln!("search {}: {status} after {} trial(s); {}", s.name, rows.len(), verdict(&s, &rows, final_best));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs trial `index` as a Slurm job (after a job that trains the shared baseline, when it is
/// not cached yet) and waits for it; a task still queued or running from before is waited for
/// instead. Returns whether it completed, and its Slurm state.
fn on_slurm(cluster: &mut crate::slurm_run::Cluster, index: usize, config: &Path) -> Result<(bool, String)> {
    if !cluster.active().contains(&index) {
        cluster.submit(&[index], &[config.to_path_buf()])?;
    }
    cluster.watch(&[index], || Ok(()))?;
    let task = cluster.tasks().remove(&index).unwrap_or_default();
    let line = format!("Slurm {} {}, Slurm's output {}", task.job, task.state, task.log);
    Ok((task.state == "COMPLETED", line))
}

/// A trial's outcome from its report: validation top-1 of the searched stage's input and of the
/// result, the objective's value, and (quantize) the layers by sensitivity.
fn outcome_of(report: &Report, stage: usize, objective: Objective, wants_sensitivity: bool) -> Option<Outcome> {
    let reference = report.stages.get(stage - 1)?.validation.as_ref()?.top1;
    let last = report.stages.last()?;
    let accuracy = last.validation.as_ref()?.top1;
    let cost = cost_of(&measured(last), objective)?;
    let sensitivity = if wants_sensitivity {
        let sens = report.stages.get(stage)?.quantization.as_ref()?.sensitivity.as_ref()?;
        sens.layers.iter().map(|(name, _, _)| name.clone()).collect()
    } else {
        Vec::new()
    };
    Some(Outcome { accuracy, reference, cost, sensitivity })
}

fn cost_of(m: &Measured, objective: Objective) -> Option<f64> {
    match objective {
        Objective::Size => m.file_bytes.map(|b| b as f64),
        Objective::Latency => m.latency_b1_ms,
        Objective::Macs => m.macs.map(|m| m as f64),
    }
}

fn objective_name(o: Objective) -> &'static str {
    match o {
        Objective::Size => "model file",
        Objective::Latency => "latency b1",
        Objective::Macs => "MACs",
    }
}

fn cost_text(o: Objective, cost: f64) -> String {
    match o {
        Objective::Size => format!("{:.3} MB", cost / 1e6),
        Objective::Latency => format!("{cost:.3} ms"),
        Objective::Macs => format!("{:.2} M", cost / 1e6),
    }
}

/// Why the winner won, in a sentence.
fn verdict(s: &Search, rows: &[Row], winner: Option<usize>) -> String {
    let within = rows.iter().filter(|r| r.holds).count();
    match winner {
        None => format!(
            "no trial of {} kept validation top-1 within {} of the reference",
            rows.len(),
            s.tolerance.describe()
        ),
        Some(w) => {
            let r = &rows[w];
            format!(
                "best {} ({}): the lowest {} ({}) among the {within} of {} trial(s) within {} of the reference validation top-1 ({:.4}); its validation top-1 {:.4}, test top-1 {} on {}",
                r.name,
                r.why,
                objective_name(s.objective),
                cost_text(s.objective, r.cost),
                rows.len(),
                s.tolerance.describe(),
                r.reference,
                r.validation_top1,
                r.measured.top1.map_or("-".into(), |t| format!("{t:.4}")),
                r.measured.evaluated_on.as_deref().unwrap_or("-"),
            )
        }
    }
}

/// The last search directory under `root` started from the same search file and base config.
fn last_search(root: &Path, fingerprint: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::fs::read_dir(root).ok()?.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    let dir = dirs.pop()?;
    (std::fs::read_to_string(dir.join("fingerprint")).ok()? == fingerprint).then_some(dir)
}

/// Copies the best trial's model file, report and config into `best/` (written as `best.new/`,
/// then swapped in), so the directory always holds one whole answer.
fn write_best(dir: &Path, run_dir: &Path, config: &Path) -> Result<()> {
    let new = dir.join("best.new");
    let _ = std::fs::remove_dir_all(&new);
    std::fs::create_dir_all(&new).with_context(|| format!("cannot create {}", new.display()))?;
    for (from, to) in [
        (run_dir.join("model.safetensors"), "model.safetensors"),
        (run_dir.join("report.md"), "report.md"),
        (run_dir.join("report.json"), "report.json"),
        (config.to_path_buf(), "config.toml"),
    ] {
        std::fs::copy(&from, new.join(to)).with_context(|| format!("cannot copy {}", from.display()))?;
    }
    let best = dir.join("best");
    let old = dir.join("best.old");
    let _ = std::fs::remove_dir_all(&old);
    if best.exists() {
        std::fs::rename(&best, &old).with_context(|| format!("cannot move {}", best.display()))?;
    }
    std::fs::rename(&new, &best).with_context(|| format!("cannot move {}", new.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn write_report(
    s: &Search,
    file: &Path,
    dir: &Path,
    rows: &[Row],
    winner: Option<usize>,
    status: &str,
    started_utc: &str,
    started: Instant,
) -> Result<()> {
    let cpu = rows
        .first()
        .and_then(|r| {
            let report: Report =
                serde_json::from_slice(&std::fs::read(dir.join(&r.run_dir).join("report.json")).ok()?).ok()?;
            Some(report.provenance.cpu)
        })
        .unwrap_or_else(crate::report::cpu_model);
    let report = SearchReport {
        name: s.name.clone(),
        source: file.display().to_string(),
        status: status.into(),
        objective: s.objective,
        tolerance: s.tolerance.describe(),
        max_trials: s.max_trials,
        timeout_minutes: s.timeout_minutes,
        started_utc: started_utc.into(),
        updated_utc: crate::report::utc(time::OffsetDateTime::now_utc()),
        elapsed_seconds: started.elapsed().as_secs_f64(),
        git_revision: crate::report::git_revision(),
        cpu,
        best: winner,
        verdict: verdict(s, rows, winner),
        trials: rows.to_vec(),
    };
    shrink_core::io::write_atomic(&dir.join("search.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    shrink_core::io::write_atomic(&dir.join("report.md"), markdown(&report).as_bytes())?;
    Ok(())
}

fn markdown(r: &SearchReport) -> String {
    let mut s = format!("# Search {} — {}\n\n", r.name, r.status);
    s += &format!(
        "- search file: `{}`; objective: {:?}; tolerance: {} of the reference validation top-1; budget: {} trial(s){}\n- {} trial(s) in {}; git {}; CPU {}; started {}, updated {}\n- decisions use validation top-1 (on the kernels that run the model); test top-1 is reported, never used to choose\n\n**{}**\n\n",
        r.source,
        r.objective,
        r.tolerance,
        r.max_trials,
        r.timeout_minutes.map(|m| format!(" or {m} minutes")).unwrap_or_default(),
        r.trials.len(),
        minutes(r.elapsed_seconds),
        r.git_revision,
        r.cpu,
        r.started_utc,
        r.updated_utc,
        r.verdict
    );
    if r.best.is_some() {
        s += "The best model so far is in `best/` (model file, report, config).\n\n";
    }
    s += "| trial | why | validation top-1 | Δ pp | within | test top-1 | model MB | MMACs | b1 ms | wall s |\n|---|---|---|---|---|---|---|---|---|---|\n";
    for t in &r.trials {
        let mark = if Some(t.index) == r.best { " **(best)**" } else { "" };
        s += &format!(
            "| {}{mark} | {} | {:.4} | {:+.2} | {} | {} | {} | {} | {} | {:.0} |\n",
            t.index,
            match &t.slurm {
                Some(task) => format!("{} (Slurm {} {})", t.why, task.job, task.state),
                None => t.why.clone(),
            },
            t.validation_top1,
            (t.validation_top1 - t.reference) * 100.0,
            if t.holds { "yes" } else { "no" },
            t.measured.top1.map_or("-".into(), |v| format!("{v:.4}")),
            t.measured.file_bytes.map_or("-".into(), |b| format!("{:.3}", b as f64 / 1e6)),
            t.measured.macs.map_or("-".into(), |m| format!("{:.2}", m as f64 / 1e6)),
            t.measured.latency_b1_ms.map_or("-".into(), |l| format!("{l:.3}")),
            t.wall_seconds
        );
    }
    s += "\nEach trial's changes are in `search.json`; its run directory (report, model) is under `trials/`.\n";
    s
}
