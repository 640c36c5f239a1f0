//! `cargo xtask sweep --slurm` on a real Slurm (CI starts a one-node cluster with
//! `scripts/slurm_local.sh` and sets `SHRINK_REQUIRE_SLURM=1`; elsewhere, without Slurm's
//! commands or a controller, these tests say so and pass without running).
//!
//! The smoke sweep through Slurm gives, trial by trial, the metrics the same sweep gives run
//! here; one task cancelled mid-trial (`scancel`) shows in the report with its Slurm state, and
//! `--resume` resubmits only it, which resumes from its checkpoint. A node that cannot write the
//! sweep directory is said, and the array cancelled.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const SMOKE: &str = "configs/sweeps/smoke_lenet.toml";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shrink-slurm-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn xtask(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.args(args).current_dir(root());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// Whether a Slurm controller answers here; with `SHRINK_REQUIRE_SLURM=1` (CI) it must.
fn slurm_here() -> bool {
    let answers = Command::new("sinfo").args(["-h", "-o", "%P"]).output().is_ok_and(|o| o.status.success());
    if !answers {
        assert!(
            std::env::var("SHRINK_REQUIRE_SLURM").as_deref() != Ok("1"),
            "SHRINK_REQUIRE_SLURM=1 but no Slurm controller answers `sinfo` (start one with scripts/slurm_local.sh start DIR and export SLURM_CONF)"
        );
        eprintln!("SKIPPED: no Slurm here (`sinfo` does not answer); CI runs this test on a one-node Slurm");
    }
    answers
}

/// Cancels a job (and every task of an array) when dropped.
struct CancelOnDrop(u64);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("scancel").arg(self.0.to_string()).stderr(std::process::Stdio::null()).status();
    }
}

/// Seconds since midnight of a UTC time `YYYY-MM-DDTHH:MM:SS[.frac]Z` (the tests run within a day).
fn seconds_of(utc: &str) -> f64 {
    let time = utc.split('T').nth(1).unwrap().trim_end_matches('Z');
    let parts: Vec<f64> = time.split(':').map(|p| p.parse().unwrap()).collect();
    parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
}

/// A sweep's trials by index: the metrics a local and a Slurm sweep must agree on.
fn metrics(
    report: &serde_json::Value,
) -> Vec<(String, serde_json::Value, serde_json::Value, serde_json::Value, serde_json::Value)> {
    report["trials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["status"].as_str().unwrap().to_string(),
                t["top1"].clone(),
                t["file_bytes"].clone(),
                t["nonzeros"].clone(),
                t["macs"].clone(),
            )
        })
        .collect()
}

#[test]
fn a_sweep_through_slurm_matches_the_local_one_and_resumes_a_cancelled_task() {
    if !slurm_here() {
        return;
    }
    let out = tmp("sweep");
    let (local_out, slurm_out) = (out.join("local"), out.join("slurm"));
    let (local_out, slurm_out) = (local_out.to_str().unwrap(), slurm_out.to_str().unwrap());

    // The same sweep here, one thread per trial (as many trials at a time as cores).
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get()).to_string();
    let local = xtask(&["sweep", "--out", local_out, "--jobs", &jobs, SMOKE], &[]);
    assert!(local.status.success(), "{}", String::from_utf8_lossy(&local.stderr));
    let local_dir = PathBuf::from(String::from_utf8(local.stdout).unwrap().trim());

    // Through Slurm, one CPU per task, detached; trial 1 stops after its second stage (its
    // checkpoint written) and waits, so it can be cancelled mid-trial.
    let t0 = Instant::now();
    let submitted = xtask(
        &["sweep", "--out", slurm_out, "--slurm", "--cpus-per-task", "1", "--detach", SMOKE],
        &[("SHRINK_TEST_STOP_AFTER_STAGES", "2"), ("SHRINK_TEST_STOP_ONLY", "smoke_lenet_t001")],
    );
    let err = String::from_utf8_lossy(&submitted.stderr);
    assert!(submitted.status.success(), "{err}");
    assert!(err.contains("--collect"), "{err}");
    let dir = PathBuf::from(String::from_utf8(submitted.stdout).unwrap().trim());
    let ledger = json(&dir.join("slurm/submissions.json"));
    let subs = ledger["submissions"].as_array().unwrap();
    assert_eq!((subs[0]["kind"].as_str(), subs[1]["kind"].as_str()), (Some("prepare"), Some("trials")));
    assert_eq!(subs[1]["after"], subs[0]["job_id"], "the array waits for the job that trains the baseline");
    let array = subs[1]["job_id"].as_u64().unwrap();
    // Should an assertion fail, the task waiting to be cancelled must not wait forever.
    let _cancel = CancelOnDrop(array);
    let script = std::fs::read_to_string(dir.join("slurm/trial.sh")).unwrap();
    assert!(script.contains("#SBATCH --cpus-per-task=1"), "{script}");

    let log = dir.join("logs/smoke_lenet_t001.log");
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("waiting to be killed") {
        assert!(t0.elapsed() < Duration::from_secs(300), "trial 1 never reached its second stage; {}", log.display());
        std::thread::sleep(Duration::from_millis(200));
    }
    // No task started before the preparation job had trained the baseline.
    let prepared = json(&dir.join(format!("slurm/prepared_{}.json", subs[0]["job_id"])));
    let finished = seconds_of(prepared["finished_utc"].as_str().unwrap());
    for i in [0, 1] {
        let start = std::fs::read_to_string(dir.join(format!("slurm/tasks/smoke_lenet_t{i:03}.start"))).unwrap();
        let at = seconds_of(start.trim().rsplit(' ').next().unwrap());
        assert!(at >= finished, "task {i} started at {at} s, before the baseline was ready at {finished} s: {start}");
    }
    // Run here meanwhile, the same sweep would run trial 1 twice: refused.
    let here = xtask(&["sweep", "--out", slurm_out, "--jobs", &jobs, SMOKE], &[]);
    let here_err = String::from_utf8_lossy(&here.stderr);
    assert_eq!(here.status.code(), Some(2), "{here_err}");
    assert!(here_err.contains("still queued or running on Slurm"), "{here_err}");
    let cancel = Command::new("scancel").arg(format!("{array}_1")).status().unwrap();
    assert!(cancel.success());

    // --collect follows the rest to their end: exit 1, the cancelled task in the report.
    let collected = xtask(&["sweep", "--collect", dir.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&collected.stderr);
    assert_eq!(collected.status.code(), Some(1), "{err}");
    let report = json(&dir.join("sweep.json"));
    assert_eq!((report["scheduler"].as_str(), report["status"].as_str()), (Some("slurm"), Some("failed")));
    let t1 = &report["trials"][1];
    assert_eq!(t1["status"], "failed", "{t1}");
    assert_eq!(t1["slurm"]["state"], "CANCELLED", "{t1}");
    assert_eq!(t1["slurm"]["job"], format!("{array}_1"));
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.contains(&format!("Slurm {array}_1 CANCELLED")), "{md}");
    for i in [0, 2, 3] {
        assert_eq!(report["trials"][i]["status"], "complete", "{}", report["trials"][i]);
    }

    // --resume resubmits trial 1 alone; it resumes after its two finished stages.
    let resumed = xtask(&["sweep", "--out", slurm_out, "--slurm", "--cpus-per-task", "1", "--resume", SMOKE], &[]);
    let err = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{err}");
    assert!(err.contains("3 finished before, 0 still queued or running, 1 to submit"), "{err}");
    let ledger = json(&dir.join("slurm/submissions.json"));
    let last = ledger["submissions"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["indices"], serde_json::json!([1]), "only the unfinished trial is resubmitted");
    let log = std::fs::read_to_string(dir.join("logs/smoke_lenet_t001.log")).unwrap();
    assert!(log.contains("after 2 finished stage(s)"), "it resumes from its checkpoint: {log}");
    eprintln!("resume test output:\n{err}");

    // The baseline was trained once, by the preparation job; every trial loaded it.
    let prepare_log: String = std::fs::read_dir(dir.join("logs/slurm"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("prepare_"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert_eq!(prepare_log.matches(" trained").count(), 1, "{prepare_log}");
    for t in std::fs::read_dir(dir.join("trials")).unwrap() {
        for run in std::fs::read_dir(t.unwrap().path()).unwrap() {
            let r = json(&run.unwrap().path().join("report.json"));
            assert!(r["stages"][0]["cached_baseline"].is_string(), "a trial trained its own baseline: {r}");
        }
    }

    // Same trials, same metrics as the local sweep.
    let (local_report, slurm_report) = (json(&local_dir.join("sweep.json")), json(&dir.join("sweep.json")));
    assert_eq!(slurm_report["status"], "complete");
    let (local_spec, slurm_spec) = (json(&local_dir.join("sweep.spec.json")), json(&dir.join("sweep.spec.json")));
    assert_eq!(local_spec["fingerprint"], slurm_spec["fingerprint"], "the same trial configs");
    assert_eq!(metrics(&local_report), metrics(&slurm_report));
    for (i, m) in metrics(&slurm_report).iter().enumerate() {
        eprintln!("trial {i}: local = slurm = {m:?}");
    }
}

#[test]
fn a_node_that_cannot_write_the_sweep_directory_is_said_and_the_array_cancelled() {
    if !slurm_here() {
        return;
    }
    let out = tmp("unshared");
    // The jobs' output goes where the node cannot write: what a sweep directory on a disk
    // local to the login node looks like from a compute node.
    let run = xtask(
        &[
            "sweep",
            "--out",
            out.to_str().unwrap(),
            "--slurm",
            "--cpus-per-task",
            "1",
            "--sbatch=--output=/nonexistent-shrink-dir/%j.out",
            SMOKE,
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{err}");
    assert!(err.contains("must be on a filesystem the nodes share"), "{err}");
    let ledger_path = std::fs::read_dir(out.join("sweeps/smoke_lenet")).unwrap().next().unwrap().unwrap().path();
    let ledger = json(&ledger_path.join("slurm/submissions.json"));
    let array = ledger["submissions"][1]["job_id"].as_u64().unwrap();
    let queued = Command::new("squeue").args(["-h", "-j", &array.to_string()]).output().unwrap();
    assert!(String::from_utf8_lossy(&queued.stdout).trim().is_empty(), "the array was left in the queue");
}

#[test]
fn slurm_options_and_a_missing_slurm_are_bad_input() {
    // Checked before anything is submitted, with or without Slurm here.
    let bad = xtask(&["sweep", "--slurm", "--time", "1h", "--dry-run", SMOKE], &[]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("slurm.time"), "{}", String::from_utf8_lossy(&bad.stderr));
    let out = tmp("nopath");
    let missing = xtask(&["sweep", "--out", out.to_str().unwrap(), "--slurm", SMOKE], &[("PATH", "/nonexistent")]);
    let err = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(2), "{err}");
    assert!(err.contains("`sbatch` is not on PATH"), "{err}");
    let detach = xtask(&["search", "--slurm", "--detach", "configs/search/smoke_lenet_mixed.toml"], &[]);
    assert_eq!(detach.status.code(), Some(2), "{}", String::from_utf8_lossy(&detach.stderr));
}

#[test]
fn a_search_through_slurm_takes_the_local_searchs_decisions() {
    if !slurm_here() {
        return;
    }
    const SEARCH: &str = "configs/search/smoke_lenet_mixed.toml";
    let out = tmp("search");
    let (local_out, slurm_out) = (out.join("local"), out.join("slurm"));
    let local = xtask(&["search", "--out", local_out.to_str().unwrap(), SEARCH], &[]);
    assert!(local.status.success(), "{}", String::from_utf8_lossy(&local.stderr));
    let on_slurm = xtask(&["search", "--out", slurm_out.to_str().unwrap(), "--slurm", SEARCH], &[]);
    let err = String::from_utf8_lossy(&on_slurm.stderr);
    assert!(on_slurm.status.success(), "{err}");
    let read =
        |o: &Output| json(&PathBuf::from(String::from_utf8_lossy(&o.stdout).trim().to_string()).join("search.json"));
    let (a, b) = (read(&local), read(&on_slurm));
    let decisions =
        |r: &serde_json::Value| -> Vec<(serde_json::Value, serde_json::Value, serde_json::Value, serde_json::Value)> {
            r["trials"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    (
                        t["why"].clone(),
                        t["validation_top1"].clone(),
                        t["holds"].clone(),
                        t["measured"]["file_bytes"].clone(),
                    )
                })
                .collect()
        };
    assert_eq!(decisions(&a), decisions(&b));
    assert_eq!(a["best"], b["best"]);
    for t in b["trials"].as_array().unwrap() {
        assert_eq!(t["slurm"]["state"], "COMPLETED", "{t}");
    }
}
