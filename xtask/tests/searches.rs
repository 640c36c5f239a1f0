//! End-to-end behaviour of `cargo xtask search`: the smoke search (per-layer widths of a LeNet-5)
//! follows the basic order, decides on validation top-1, keeps the best model so far in `best/`;
//! killed and run again it reuses the finished trials and ends as the uninterrupted search;
//! bad search files exit 2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const SMOKE: &str = "configs/search/smoke_lenet_mixed.toml";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shrink-search-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn search(out: &Path, file: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["search", "--out", &out.display().to_string(), file])
        .current_dir(root())
        .output()
        .unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// (why, validation top-1, holds) of each trial.
fn decisions(report: &serde_json::Value) -> Vec<(String, f64, bool)> {
    report["trials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["why"].as_str().unwrap().to_string(),
                t["validation_top1"].as_f64().unwrap(),
                t["holds"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn smoke(out: &Path) -> (PathBuf, serde_json::Value) {
    let o = search(out, SMOKE);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dir = PathBuf::from(String::from_utf8(o.stdout).unwrap().trim());
    let report = json(&dir.join("search.json"));
    (dir, report)
}

#[test]
fn the_smoke_search_follows_the_basic_order_and_keeps_the_best_model() {
    let out = tmp("smoke");
    let (dir, report) = smoke(&out);
    assert_eq!(report["status"], "finished");
    let trials = report["trials"].as_array().unwrap();
    assert!(trials.len() >= 2, "{report}");
    assert!(trials[0]["why"].as_str().unwrap().starts_with("every layer at int2"));
    assert!(trials[1]["why"].as_str().unwrap().starts_with("fall back `"));
    // Decisions: validation top-1 against the reference (the f32 model's validation top-1,
    // from the trial's own report), 1 pp.
    for t in trials {
        let run = json(&dir.join(t["run_dir"].as_str().unwrap()).join("report.json"));
        let stages = run["stages"].as_array().unwrap();
        assert_eq!(
            t["reference"], stages[0]["validation"]["top1"],
            "the reference is the f32 model's validation top-1"
        );
        assert_eq!(t["validation_top1"], stages.last().unwrap()["validation"]["top1"]);
        let lost = t["reference"].as_f64().unwrap() - t["validation_top1"].as_f64().unwrap();
        assert_eq!(t["holds"].as_bool().unwrap(), lost <= 0.01 + 1e-9, "{t}");
        assert_eq!(t["cost"].as_f64().unwrap() as u64, stages.last().unwrap()["file_bytes"].as_u64().unwrap());
    }
    // The first trial measured each layer's sensitivity on the validation images.
    let first = json(&dir.join(trials[0]["run_dir"].as_str().unwrap()).join("report.json"));
    assert_eq!(first["stages"][1]["quantization"]["sensitivity"]["split"], "validation");
    // The best: the smallest file among the trials that hold; its files are in best/.
    let best = report["best"].as_u64().map(|b| b as usize);
    let holding: Vec<&serde_json::Value> = trials.iter().filter(|t| t["holds"] == true).collect();
    match best {
        Some(b) => {
            let min = holding.iter().map(|t| t["cost"].as_f64().unwrap()).fold(f64::INFINITY, f64::min);
            assert_eq!(trials[b]["cost"].as_f64().unwrap(), min);
            let run_dir = dir.join(trials[b]["run_dir"].as_str().unwrap());
            assert_eq!(
                std::fs::read(dir.join("best/model.safetensors")).unwrap(),
                std::fs::read(run_dir.join("model.safetensors")).unwrap()
            );
            assert!(report["verdict"].as_str().unwrap().contains(trials[b]["name"].as_str().unwrap()));
        }
        None => assert!(holding.is_empty()),
    }
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.contains("validation top-1") && md.contains(report["verdict"].as_str().unwrap()), "{md}");
    // Again: the same directory, every trial read back, the same decisions.
    let (again_dir, again) = smoke(&out);
    assert_eq!(again_dir, dir);
    assert_eq!(decisions(&again), decisions(&report));
    for t in trials {
        let runs = std::fs::read_dir(dir.join("trials").join(t["name"].as_str().unwrap())).unwrap().count();
        assert_eq!(runs, 1, "{} ran again", t["name"]);
    }
}

#[test]
fn a_killed_search_resumes_and_ends_as_an_uninterrupted_one() {
    let reference_out = tmp("uninterrupted");
    let (_, uninterrupted) = smoke(&reference_out);
    let out = tmp("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["search", "--out", &out.display().to_string(), SMOKE])
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let two_done = || {
        let dirs: Vec<PathBuf> = std::fs::read_dir(out.join("searches/smoke_lenet_mixed"))
            .map(|rd| rd.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        dirs.first().and_then(|d| std::fs::read(d.join("search.json")).ok()).is_some_and(|b| {
            serde_json::from_slice::<serde_json::Value>(&b).is_ok_and(|r| r["trials"].as_array().unwrap().len() >= 2)
        })
    };
    while !two_done() {
        assert!(start.elapsed() < Duration::from_secs(120), "the search did not get there");
        assert!(child.try_wait().unwrap().is_none(), "the search ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let (_, resumed) = smoke(&out);
    assert_eq!(resumed["status"], "finished");
    assert_eq!(decisions(&resumed), decisions(&uninterrupted));
    assert_eq!(resumed["best"], uninterrupted["best"]);
}

#[test]
fn bad_search_files_exit_2_naming_the_file_and_key() {
    let out = tmp("bad");
    let smoke = std::fs::read_to_string(root().join(SMOKE)).unwrap();
    let smoke = smoke.replace(
        "base = \"../smoke/lenet_int8.toml\"",
        &format!("base = {:?}", root().join("configs/smoke/lenet_int8.toml")),
    );
    let cases = [
        (smoke.replace("stage = 1", "stage = 0"), "stage 0 of the base config is a train stage"),
        (smoke.replace("stage = 1", "stage = 9"), "the base config has 3 stages"),
        (smoke.replace("\"data.validation_fraction\" = 0.2, ", ""), "no validation split"),
        (smoke.replace("bits = [2, 8]", "bits = [8, 2]"), "key `quantize.bits`"),
        (smoke.replace("objective = \"size\"", "objective = \"fast\""), ":6:"),
        (smoke.replace("\"data.test_limit\" = 200", "\"data.test_limit\" = -3"), "trial smoke_lenet_mixed_t000"),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let file = out.join(format!("bad{i}.toml"));
        std::fs::write(&file, text).unwrap();
        let o = search(&out, &file.display().to_string());
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{expected}: {err}");
        assert!(err.contains(&file.display().to_string()) && err.contains(expected), "expected {expected:?} in {err}");
    }
    assert!(!out.join("searches").exists(), "nothing written for a bad search");
}

#[test]
fn every_shipped_search_dry_runs() {
    let mut seen = 0;
    for entry in std::fs::read_dir(root().join("configs/search")).unwrap() {
        let path = entry.unwrap().path();
        let rel = path.strip_prefix(root()).unwrap().display().to_string();
        let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["search", "--dry-run", &rel])
            .current_dir(root())
            .output()
            .unwrap();
        assert!(o.status.success(), "{rel}: {}", String::from_utf8_lossy(&o.stderr));
        seen += 1;
    }
    assert!(seen >= 3);
}
