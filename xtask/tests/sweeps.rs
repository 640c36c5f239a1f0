//! End-to-end behaviour of `cargo xtask sweep`: the smoke sweep runs its trials side by side on
//! one shared baseline and reports them with their Pareto fronts; a killed sweep resumes
//! (finished trials kept, a trial killed mid-run from its checkpoint, no trial left running);
//! a changed sweep file starts a new sweep unless `--resume`; bad sweeps exit 2.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use xtask::sweep::{Sense, pareto_front};

const SMOKE: &str = "configs/sweeps/smoke_lenet.toml";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shrink-sweep-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.args(args).current_dir(root());
    c
}

fn sweep(out: &Path, file: &str, extra: &[&str]) -> Output {
    let out = out.display().to_string();
    let mut args = vec!["sweep", "--out", &out];
    args.extend_from_slice(extra);
    args.push(file);
    command(&args).output().unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn sweep_dirs(out: &Path, name: &str) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(out.join("sweeps").join(name))
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs
}

/// Run directories of each trial (`trials/<name>/<stamp>`), by trial name.
fn run_dirs(dir: &Path) -> std::collections::BTreeMap<String, Vec<PathBuf>> {
    std::fs::read_dir(dir.join("trials"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|t| {
            let runs: Vec<PathBuf> = std::fs::read_dir(&t).unwrap().map(|e| e.unwrap().path()).collect();
            (t.file_name().unwrap().to_string_lossy().into_owned(), runs)
        })
        .collect()
}

#[test]
fn the_smoke_sweep_runs_side_by_side_on_one_baseline_and_reports_its_fronts() {
    let out = tmp("smoke");
    let first = sweep(&out, SMOKE, &["--jobs", "2"]);
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{err}");
    let dir = PathBuf::from(String::from_utf8(first.stdout).unwrap().trim());
    assert!(err.contains("[4/4]") && err.contains("top-1"), "a line per finished trial: {err}");
    let report = json(&dir.join("sweep.json"));
    assert_eq!(report["status"], "complete");
    assert_eq!(report["jobs"], 2);
    assert_eq!(report["latency_measured_concurrently"], true);
    let trials = report["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 4);
    // One baseline trained and cached, shared by the four trials.
    let cached: Vec<PathBuf> = std::fs::read_dir(out.join("cache/baselines"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let mut reused = 0;
    for t in trials {
        assert_eq!(t["status"], "complete", "{t}");
        let run = json(&dir.join(t["run_dir"].as_str().unwrap()).join("report.json"));
        reused += usize::from(!run["stages"][0]["cached_baseline"].is_null());
        // The row is the trial's report: the last stage's numbers, on the integer kernels.
        let last = run["stages"].as_array().unwrap().last().unwrap();
        assert_eq!(t["top1"], last["test"]["top1"]);
        assert_eq!(t["file_bytes"], last["file_bytes"]);
        assert_eq!(t["evaluated_on"], "cpu-plan-int8");
        assert_eq!(t["runner"], "cpu-plan-int8");
        assert!(t["latency_b1_ms"].as_f64().unwrap() > 0.0, "`set` adds batch 1: {t}");
        assert_eq!(t["batch_n"], 8);
        // The trial's config is the base with the axes' values.
        let config =
            std::fs::read_to_string(dir.join("configs").join(format!("{}.toml", t["name"].as_str().unwrap()))).unwrap();
        let config: toml::Value = toml::from_str(&config).unwrap();
        let changes = t["changes"].as_array().unwrap();
        assert_eq!(config["stages"][1]["sparsity"].to_string(), changes[0][1].as_str().unwrap());
        assert_eq!(config["stages"][2]["weight_bits"].to_string(), changes[1][1].as_str().unwrap());
        assert_eq!(config["threads"].as_integer(), Some(report["threads_per_trial"].as_i64().unwrap()));
    }
    assert_eq!(reused, 3, "one trial trains the baseline, three reuse it");
    // The front marks are the library's fronts of (top-1, cost).
    for (flag, cost) in [("front_size", "file_bytes"), ("front_latency", "latency_b1_ms"), ("front_macs", "macs")] {
        let points: Vec<Vec<f64>> =
            trials.iter().map(|t| vec![t["top1"].as_f64().unwrap(), t[cost].as_f64().unwrap()]).collect();
        let front = pareto_front(&points, &[Sense::Maximize, Sense::Minimize]);
        let marked: Vec<bool> = trials.iter().map(|t| t[flag].as_bool().unwrap()).collect();
        assert_eq!(marked, front, "{flag}");
        assert!(front.iter().any(|&on| on));
    }
    for chart in ["pareto_size.svg", "pareto_latency.svg", "pareto_macs.svg"] {
        let svg = std::fs::read_to_string(dir.join(chart)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("baseline") && svg.contains("t003"), "{chart}");
    }
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.contains("| 3 |") && md.contains("●") && md.contains("measured while other trials"), "{md}");

    // The same command again: the same sweep, nothing runs again.
    let before = run_dirs(&dir);
    let again = sweep(&out, SMOKE, &["--jobs", "2"]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{err}");
    assert_eq!(PathBuf::from(String::from_utf8(again.stdout).unwrap().trim()), dir);
    assert!(err.contains("4 finished before"), "{err}");
    assert_eq!(run_dirs(&dir), before);
}

/// Starts a sweep with extra environment; returns it once a line containing `marker` appeared
/// in `watch` (a file), or panics after two minutes.
fn start_until(out: &Path, file: &str, env: (&str, &str), watch: &dyn Fn() -> bool) -> Child {
    let out = out.display().to_string();
    let mut child = command(&["sweep", "--out", &out, file])
        .env(env.0, env.1)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    // Drain stderr so the sweep never blocks on a full pipe.
    std::thread::spawn(move || for _ in BufReader::new(stderr).lines() {});
    let start = Instant::now();
    while !watch() {
        assert!(start.elapsed() < Duration::from_secs(120), "the sweep did not get there");
        assert!(child.try_wait().unwrap().is_none(), "the sweep ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// Processes whose command line mentions `needle` (Linux: /proc).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    procs
        .flatten()
        .filter_map(|p| std::fs::read(p.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle))
        .collect()
}

#[test]
fn a_killed_sweep_resumes_its_unfinished_trials_only() {
    let out = tmp("kill");
    // 1. Killed after two finished trials.
    let dir_of = || sweep_dirs(&out, "smoke_lenet").pop();
    let report_says = |n: usize| {
        move |dir: &Path| {
            std::fs::read(dir.join("sweep.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_some_and(|r| {
                    r["trials"].as_array().unwrap().iter().filter(|t| t["status"] == "complete").count() == n
                })
        }
    };
    let mut first = start_until(&out, SMOKE, ("SHRINK_TEST_STOP_AFTER_TRIALS", "2"), &|| {
        dir_of().is_some_and(|d| report_says(2)(&d))
    });
    first.kill().unwrap();
    first.wait().unwrap();
    let dir = dir_of().unwrap();
    let kept: Vec<Vec<u8>> = ["smoke_lenet_t000", "smoke_lenet_t001"]
        .iter()
        .map(|t| std::fs::read(run_dirs(&dir)[*t][0].join("report.json")).unwrap())
        .collect();

    // 2. Killed while trial 2 waits after its second stage (prune) is checkpointed.
    let log = dir.join("logs/smoke_lenet_t002.log");
    let mut second = start_until(&out, SMOKE, ("SHRINK_TEST_STOP_AFTER_STAGES", "2"), &|| {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("waiting to be killed"))
    });
    second.kill().unwrap();
    second.wait().unwrap();
    // The trial dies with the sweep (PR_SET_PDEATHSIG): nothing keeps running on its own.
    let needle = dir.join("configs").display().to_string();
    let start = Instant::now();
    while !processes_mentioning(&needle).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "left running: {:?}", processes_mentioning(&needle));
        std::thread::sleep(Duration::from_millis(50));
    }

    // 3. The same command finishes the sweep: the two finished trials untouched, trial 2
    // resumed after its two finished stages, trial 3 run.
    let last = sweep(&out, SMOKE, &[]);
    let err = String::from_utf8_lossy(&last.stderr);
    assert!(last.status.success(), "{err}");
    assert_eq!(PathBuf::from(String::from_utf8(last.stdout).unwrap().trim()), dir);
    assert!(err.contains("2 finished before") && err.contains("[4/4]"), "{err}");
    let runs = run_dirs(&dir);
    assert!(runs.values().all(|r| r.len() == 1), "one run directory per trial: {runs:?}");
    for (t, bytes) in ["smoke_lenet_t000", "smoke_lenet_t001"].iter().zip(&kept) {
        assert_eq!(&std::fs::read(runs[*t][0].join("report.json")).unwrap(), bytes, "{t} ran again");
    }
    let t2 = json(&runs["smoke_lenet_t002"][0].join("report.json"));
    assert_eq!(t2["status"], "complete");
    assert_eq!(t2["resumed"][0]["stages_kept"], 2, "{}", t2["resumed"]);
    assert_eq!(json(&dir.join("sweep.json"))["status"], "complete");
}

#[test]
fn a_changed_sweep_file_starts_a_new_sweep_unless_resumed() {
    let out = tmp("changed");
    let file = out.join("s.toml");
    let smoke = std::fs::read_to_string(root().join(SMOKE)).unwrap();
    let text = smoke
        .replace(
            "base = \"../smoke/lenet_prune.toml\"",
            &format!("base = {:?}", root().join("configs/smoke/lenet_prune.toml")),
        )
        .replace("values = [8, 4]", "values = [8]")
        .replace("name = \"smoke_lenet\"", "name = \"changed\"");
    std::fs::write(&file, &text).unwrap();
    let f = file.display().to_string();
    assert!(sweep(&out, &f, &[]).status.success());
    let old = sweep_dirs(&out, "changed");
    assert_eq!(old.len(), 1);
    // A third sparsity: a new sweep directory, and the message says what changed.
    std::fs::write(&file, text.replace("values = [0.5, 0.8]", "values = [0.5, 0.8, 0.9]")).unwrap();
    // Sweep directories are named by the second they start.
    std::thread::sleep(Duration::from_millis(1100));
    let new = sweep(&out, &f, &["--dry-run"]);
    assert!(new.status.success() && sweep_dirs(&out, "changed").len() == 1, "a dry run creates nothing");
    let new = sweep(&out, &f, &[]);
    let err = String::from_utf8_lossy(&new.stderr);
    assert!(new.status.success(), "{err}");
    assert!(err.contains("changed since") && err.contains("trial 2 is new") && err.contains("--resume"), "{err}");
    assert_eq!(sweep_dirs(&out, "changed").len(), 2);
    // --resume continues the last sweep even when the file changed again: the two trials
    // whose config is unchanged are kept.
    std::fs::write(&file, text.replace("values = [0.5, 0.8]", "values = [0.5, 0.8, 0.95]")).unwrap();
    let resumed = sweep(&out, &f, &["--resume"]);
    let err = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{err}");
    assert!(err.contains("--resume: continuing") && err.contains("trial 2: stages[1].sparsity = 0.9"), "{err}");
    assert!(err.contains("2 finished before"), "{err}");
    assert_eq!(sweep_dirs(&out, "changed").len(), 2);
}

#[test]
fn bad_sweeps_exit_2_naming_the_file_and_place() {
    let out = tmp("bad");
    let write = |name: &str, text: &str| {
        let p = out.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let base = format!("base = {:?}\n", root().join("configs/smoke/lenet_prune.toml"));
    let cases = [
        (
            write("typo.toml", &format!("{base}[[axes]]\nfeild = \"seed\"\nvalues = [1]\n")),
            "typo.toml:3:1: unknown field `feild`".to_string(),
        ),
        (
            write("field.toml", &format!("{base}[[axes]]\nfield = \"stages[1].sparsity_typo\"\nvalues = [0.5]\n")),
            "field.toml: trial 0 (stages[1].sparsity_typo = 0.5)".to_string(),
        ),
        (
            write("range.toml", &format!("{base}[[axes]]\nfield = \"stages[1].sparsity\"\nvalues = [0.5, 1.5]\n")),
            "range.toml: trial 1 (stages[1].sparsity = 1.5)".to_string(),
        ),
        (
            write("stage.toml", &format!("{base}[[axes]]\nfield = \"stages[7].sparsity\"\nvalues = [0.5]\n")),
            "`stages` has 3 entries".to_string(),
        ),
        (
            write("nobase.toml", "base = \"missing.toml\"\n[[axes]]\nfield = \"seed\"\nvalues = [1]\n"),
            "missing.toml".to_string(),
        ),
    ];
    for (file, expected) in cases {
        let o = sweep(&out, &file, &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{file}: {err}");
        assert!(err.contains(&expected), "{file}: expected {expected:?} in {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let o = sweep(&out, SMOKE, &["--jobs", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--jobs 0"));
    assert!(!out.join("sweeps").exists(), "nothing written for a bad sweep");
}

#[test]
fn every_shipped_sweep_dry_runs() {
    let mut seen = 0;
    for entry in std::fs::read_dir(root().join("configs/sweeps")).unwrap() {
        let path = entry.unwrap().path();
        let rel = path.strip_prefix(root()).unwrap().display().to_string();
        let o = command(&["sweep", "--dry-run", &rel]).output().unwrap();
        assert!(o.status.success(), "{rel}: {}", String::from_utf8_lossy(&o.stderr));
        seen += 1;
    }
    assert!(seen >= 2);
    let o = command(&["sweep", "--dry-run", "configs/sweeps/resnet_pareto.toml"]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("16 trial(s)"));
}
