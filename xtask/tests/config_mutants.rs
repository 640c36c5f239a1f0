//! A generator, not just a corpus (issue #22): every valid config in `configs/` and
//! `configs/smoke/` is mutated — values replaced by other types and by extremes, keys deleted,
//! renamed, duplicated or added where they do not belong, stages deleted, swapped or repeated a
//! thousand times, arrays grown to 100,000 entries — and `cargo xtask run --dry-run` on each
//! mutant must either accept it or exit 2 naming the file and the line or key, within a time and
//! memory bound: never an abort, a hang, a panic or another exit code.
//!
//! `SHRINK_CONFIG_MUTANTS` sets how many mutants run (CI runs the default); the outcome counts
//! are printed (`--nocapture`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Mutants run by default: enough to cover every config and mutation kind several times in
/// about a minute on CI's two cores.
const DEFAULT_MUTANTS: u32 = 400;
/// A dry run reads headers and builds models for names: seconds at most.
const TIME_LIMIT: Duration = Duration::from_secs(60);
/// Address space a dry run may use (its real use is tens of MB; a model that would not fit must
/// be refused before it is allocated).
const MEMORY_LIMIT_KIB: u64 = 8 << 20;

const VALUES: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    "3",
    "7",
    "1000000000",
    "4000000000",
    "18446744073709551615",
    "9223372036854775807",
    "-9223372036854775808",
    "0.0",
    "-0.5",
    "0.5",
    "0.999999",
    "1.5",
    "1e308",
    "1e-308",
    "nan",
    "inf",
    "-inf",
    "true",
    "false",
    "\"\"",
    "\"x\"",
    "\"adam\"",
    "\"channels\"",
    "\"2:4\"",
    "\".*\"",
    "\"(\"",
    "[]",
    "[0]",
    "[1, 2]",
    "[1000000000]",
    "[\"a\", 1]",
    "{}",
    "{ kind = \"x\" }",
    "{ kind = \"sgd\", lr = 0.1 }",
    "1979-05-27",
    "1979-05-27T07:32:00Z",
    "\"data/mnist5k\"",
    "\"/nonexistent\"",
    "\"../../../../etc/passwd\"",
];

const KEYS: &[&str] = &[
    "epochs",
    "batch_size",
    "hidden",
    "depth",
    "width",
    "sparsity",
    "round_to",
    "updates",
    "weight_bits",
    "lr",
    "weight_decay",
    "momentum",
    "seed",
    "threads",
    "name",
    "kind",
    "granularity",
    "overrides",
    "skip",
    "classes",
    "image_size",
    "channels",
    "train_limit",
    "test_limit",
    "validation_fraction",
    "batch_sizes",
    "repeats",
    "warmup",
    "calibration_batches",
    "temperature",
    "alpha",
    "teachers",
    "hints",
    "allow_untrained",
    "mean",
    "std",
    "path",
    "prune_schedule",
    "schedule",
    "optimizer",
    "calibrator",
    "adaround",
    "seeds",
    "sensitivity",
];

/// One mutation of a config's text, chosen by `choice` and placed by `place`.
fn mutate(text: &str, choice: u8, place: u64) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let pick = |candidates: &[usize]| candidates.get(place as usize % candidates.len().max(1)).copied();
    let assignments: Vec<usize> = (0..lines.len()).filter(|&i| lines[i].contains(" = ")).collect();
    let value = VALUES[(place / 7) as usize % VALUES.len()];
    let key = KEYS[(place / 11) as usize % KEYS.len()];
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    match choice % 9 {
        // Replace a whole value.
        0 => {
            if let Some(i) = pick(&assignments) {
                let k = lines[i].split(" = ").next().unwrap_or("");
                out[i] = format!("{k} = {value}");
            }
        }
        // Replace a value inside an inline table or array.
        1 => {
            let inner: Vec<usize> =
                assignments.iter().copied().filter(|&i| lines[i].contains('{') || lines[i].contains('[')).collect();
            if let Some(i) = pick(&inner) {
                let line = lines[i];
                let starts: Vec<usize> = line.match_indices(" = ").map(|(p, _)| p + 3).collect();
                if let Some(&s) = starts.get((place / 13) as usize % starts.len()) {
                    let end = line[s..].find([',', '}', ']']).map_or(line.len(), |e| s + e);
                    out[i] = format!("{}{value}{}", &line[..s], &line[end..]);
                }
            }
        }
        // Delete a line.
        2 => {
            if let Some(i) = pick(&assignments) {
                out.remove(i);
            }
        }
        // Rename a key (to another setting's name or a typo).
        3 => {
            if let Some(i) = pick(&assignments) {
                let rest = lines[i].split_once(" = ").map_or("", |(_, v)| v);
                let name = if place.is_multiple_of(2) { key.to_string() } else { format!("{key}x") };
                out[i] = format!("{name} = {rest}");
            }
        }
        // Add a key to some table.
        4 => {
            let headers: Vec<usize> = (0..lines.len()).filter(|&i| lines[i].starts_with('[')).collect();
            let at = pick(&headers).map_or(0, |i| i + 1);
            out.insert(at, format!("{key} = {value}"));
        }
        // Duplicate a line.
        5 => {
            if let Some(i) = pick(&assignments) {
                out.insert(i, lines[i].to_string());
            }
        }
        // Stages: delete one, swap two, or repeat one many times.
        6 | 7 => {
            let (head, stages) = split_stages(text);
            if stages.is_empty() {
                return text.to_string();
            }
            let mut stages = stages;
            let i = place as usize % stages.len();
            match (choice / 9) % 3 {
                0 => {
                    stages.remove(i);
                }
                1 => {
                    let j = (place / 3) as usize % stages.len();
                    stages.swap(i, j);
                }
                _ => {
                    let copies = [2, 10, 1000][(place / 5) as usize % 3];
                    let s = stages[i].clone();
                    stages.splice(i..i, std::iter::repeat_n(s, copies));
                }
            }
            return format!("{head}{}", stages.concat());
        }
        // Grow an array to 100,000 entries.
        _ => {
            let arrays: Vec<usize> = assignments.iter().copied().filter(|&i| lines[i].contains(" = [")).collect();
            if let Some(i) = pick(&arrays) {
                let k = lines[i].split(" = ").next().unwrap_or("");
                let item = ["1", "8", "0.5", "\"fc1\""][(place / 17) as usize % 4];
                out[i] = format!("{k} = [{}]", vec![item; 100_000].join(", "));
            }
        }
    }
    out.join("\n") + "\n"
}

/// The text before the first `[[stages]]` and each stage's text.
fn split_stages(text: &str) -> (String, Vec<String>) {
    let mut parts = text.split("[[stages]]");
    let head = parts.next().unwrap_or("").to_string();
    (head, parts.map(|p| format!("[[stages]]{p}")).collect())
}

#[derive(Debug)]
enum Outcome {
    Accepted,
    Refused,
}

/// Runs the dry run on `path` within the bounds; the outcome, or what went wrong.
fn dry_run(path: &Path) -> Result<Outcome, String> {
    let script = format!("ulimit -v {MEMORY_LIMIT_KIB}; exec \"$0\" run --dry-run \"$1\"");
    // Output goes to files: a pipe read only after the child ends would block a child that
    // writes more than the pipe holds.
    let (out_path, err_path) = (path.with_extension("stdout"), path.with_extension("stderr"));
    let file = |p: &Path| std::fs::File::create(p).map(Stdio::from).map_err(|e| e.to_string());
    let mut child = Command::new("sh")
        .args(["-c", &script, env!("CARGO_BIN_EXE_xtask"), &path.display().to_string()])
        .current_dir(root())
        .stdout(file(&out_path)?)
        .stderr(file(&err_path)?)
        .spawn()
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if start.elapsed() > TIME_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no answer in {TIME_LIMIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let read = |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    let (stdout, stderr) = (read(&out_path), read(&err_path));
    let file = path.display().to_string();
    match status.code() {
        Some(0) if stdout.contains(": ok") => Ok(Outcome::Accepted),
        Some(2) => {
            // `file:line:col: …`, a key, or a refusal of the whole file (its size).
            let located = stderr.starts_with(&format!("error: {file}:"))
                && (stderr[8 + file.len()..].split(':').next().is_some_and(|l| l.parse::<usize>().is_ok())
                    || stderr.contains("key `")
                    || stderr.contains("configs of up to"));
            if located && !stderr.contains("panicked") {
                Ok(Outcome::Refused)
            } else {
                Err(format!("exit 2 without a located message: {stderr}"))
            }
        }
        code => Err(format!("exit {code:?} (signal or abort when None): {stderr}")),
    }
}

#[test]
fn mutated_configs_are_accepted_or_refused_with_a_located_message() {
    let mut sources = Vec::new();
    for dir in ["configs", "configs/smoke", "configs/bench"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        sources.extend(files.into_iter().map(|p| std::fs::read_to_string(p).unwrap()));
    }
    let cases: u32 =
        std::env::var("SHRINK_CONFIG_MUTANTS").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_MUTANTS);
    let dir = std::env::temp_dir().join(format!("shrink-mutants-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let counts = std::cell::RefCell::new([0usize; 2]);
    let slowest = std::cell::Cell::new(Duration::ZERO);
    let config = Config { cases, failure_persistence: None, ..Config::default() };
    // A fixed seed: CI runs the same mutants every time; SHRINK_CONFIG_MUTANTS widens the net.
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]));
    let strategy = (0..sources.len(), proptest::collection::vec((any::<u8>(), any::<u64>()), 1..4));
    let result = runner.run(&strategy, |(source, ops)| {
        let mut text = sources[source].clone();
        for &(choice, place) in &ops {
            let mutated = mutate(&text, choice, place);
            // Beyond the size limit every config is refused unread: one such mutant is enough.
            if mutated.len() < 4 << 20 || text.len() < 64 << 10 {
                text = mutated;
            }
        }
        let path = dir.join("mutant.toml");
        std::fs::write(&path, &text).unwrap();
        let t0 = Instant::now();
        let outcome = dry_run(&path);
        slowest.set(slowest.get().max(t0.elapsed()));
        match outcome {
            Ok(Outcome::Accepted) => counts.borrow_mut()[0] += 1,
            Ok(Outcome::Refused) => counts.borrow_mut()[1] += 1,
            Err(why) => {
                let kept = dir.join("failing.toml");
                std::fs::write(&kept, &text).unwrap();
                return Err(TestCaseError::fail(format!("{why}\n(mutant kept in {})", kept.display())));
            }
        }
        Ok(())
    });
    let [accepted, refused] = *counts.borrow();
    println!(
        "config mutants: {} from {} configs: {accepted} accepted, {refused} refused with a located message (exit 2); slowest {:?}",
        accepted + refused,
        sources.len(),
        slowest.get()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(refused > 0 && accepted > 0, "both outcomes occur: {accepted} accepted, {refused} refused");
}
