//! End-to-end behaviour of `cargo xtask run`: every config dry-runs, the smoke configs run,
//! baselines are cached, runs are deterministic, bad input exits 2 with a useful message.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).current_dir(root()).output().unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shrink-xtask-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn configs(dir: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| p.strip_prefix(root()).unwrap().display().to_string())
        .collect();
    v.sort();
    v
}

fn report(run_dir: &str) -> serde_json::Value {
    let dir = root().join(run_dir.trim());
    serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap()
}

#[test]
fn every_config_dry_runs() {
    let mut all = configs("configs");
    all.extend(configs("configs/smoke"));
    all.extend(configs("configs/bench"));
    assert!(all.len() >= 3);
    for c in all {
        let out = xtask(&["run", "--dry-run", &c]);
        assert!(out.status.success(), "{c}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
    }
}

#[test]
fn smoke_configs_run_cache_their_baseline_and_are_deterministic() {
    let out_dir = tmp("smoke");
    let out_arg = out_dir.display().to_string();
    let smoke = configs("configs/smoke");
    let mut args = vec!["run", "-q", "--out", &out_arg];
    args.extend(smoke.iter().map(|s| s.as_str()));
    let first = xtask(&args);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let dirs: Vec<String> = String::from_utf8(first.stdout).unwrap().lines().map(String::from).collect();
    assert_eq!(dirs.len(), smoke.len(), "stdout carries one run directory per config");
    for d in &dirs {
        let r = report(d);
        assert_eq!(r["status"], "complete", "{d}");
        for f in ["config.resolved.toml", "report.md", "log.txt", "model.safetensors", "training_curve.svg"] {
            assert!(root().join(d).join(f).exists(), "{d}/{f}");
        }
        let stages = r["stages"].as_array().unwrap();
        let last = stages.last().unwrap();
        assert!(last["params"].as_u64().unwrap() > 0);
        assert!(last["macs"].as_u64().unwrap() > 0);
        assert!(!last["latency"].as_array().unwrap().is_empty());
        assert!(r["provenance"]["git_revision"].as_str().is_some());
    }
    // The MLP smoke run learns something real in two epochs on 400 images.
    let mlp = report(dirs.iter().find(|d| d.contains("smoke_mlp/")).unwrap());
    let acc = mlp["stages"][1]["test"]["top1"].as_f64().unwrap();
    assert!(acc > 0.6, "smoke MLP accuracy {acc}");
    assert!(mlp["stages"][0]["cache_key"].as_str().is_some());

    // The int8 smoke run: evaluated on the integer kernels, close to its f32 baseline and to its
    // own simulation, a model file about a quarter of the f32 one that loads back.
    let int8_dir = dirs.iter().find(|d| d.contains("smoke_lenet_int8")).unwrap();
    let int8 = report(int8_dir);
    let (base, q) = (&int8["stages"][0], &int8["stages"][1]);
    assert_eq!(q["kind"], "quantize");
    assert_eq!(q["evaluated_on"], "cpu-plan-int8");
    let top1 = |v: &serde_json::Value| v["top1"].as_f64().unwrap();
    let (f32_acc, int_acc) = (top1(&base["test"]), top1(&q["test"]));
    let sim_acc = top1(&q["quantization"]["simulated_test"]);
    assert!((f32_acc - int_acc).abs() <= 0.03, "f32 {f32_acc} vs int8 {int_acc}");
    assert!((sim_acc - int_acc).abs() <= 0.01, "simulated {sim_acc} vs integer {int_acc}");
    let ratio = q["file_bytes"].as_f64().unwrap() / base["file_bytes"].as_f64().unwrap();
    assert!(ratio < 0.3, "int8 file ratio {ratio}");
    assert!(q["latency"].as_array().unwrap().iter().any(|l| l["runner"] == "cpu-plan-int8"));
    let layers = q["quantization"]["quantized_layers"].as_array().unwrap();
    assert!(layers.iter().any(|l| l[0] == "fc3" && l[1] == 4), "the override gave fc3 4-bit weights: {layers:?}");
    let weights = q["quantization"]["weights"].as_str().unwrap();
    assert!(
        weights.contains("biases corrected") && weights.contains("cross-layer equalized (4 layer pairs)"),
        "{weights}"
    );
    assert!(weights.contains("AdaRound (50 steps per layer on 64 calibration images)"), "{weights}");
    let sens = &q["quantization"]["sensitivity"];
    assert_eq!(sens["layers"].as_array().unwrap().len(), layers.len(), "one row per quantized layer");
    assert!(root().join(int8_dir).join(sens["chart"].as_str().unwrap()).exists());
    let device = shrink_core::BackendKind::Flex.device().unwrap();
    let loaded = shrink_quant::QuantizedModel::load(&root().join(int8_dir).join("model.safetensors"), &device).unwrap();
    assert_eq!(loaded.layers.len(), layers.len());

    // Dynamic quantization: the MLP's linear layers on integer kernels, no calibration.
    let dynamic = report(dirs.iter().find(|d| d.contains("smoke_mlp_dynamic")).unwrap());
    let dq = &dynamic["stages"][1];
    assert_eq!(dq["quantization"]["method"], "dynamic post-training");
    let weights = dq["quantization"]["weights"].as_str().unwrap();
    assert!(weights.starts_with("int8 weights, asymmetric, per output channel"), "{weights}");
    let kernels = dq["quantization"]["quantized_layers"].as_array().unwrap();
    assert!(!kernels.is_empty() && kernels.iter().all(|l| l[2].as_str().unwrap().starts_with("linear/int8-dynamic")));
    let (f32_acc, dyn_acc) = (top1(&dynamic["stages"][0]["test"]), top1(&dq["test"]));
    assert!((f32_acc - dyn_acc).abs() <= 0.03, "f32 {f32_acc} vs dynamic int8 {dyn_acc}");

    // QAT at 2-bit weights: on the integer kernels, well above 2-bit post-training quantization
    // with the same settings, agreeing with its own simulation, and a far smaller file.
    let qat = report(dirs.iter().find(|d| d.contains("smoke_lenet_qat/")).unwrap());
    let (base, q) = (&qat["stages"][0], &qat["stages"][1]);
    assert_eq!(q["kind"], "qat");
    assert_eq!(q["evaluated_on"], "cpu-plan-int8");
    let summary = &q["quantization"];
    let method = summary["method"].as_str().unwrap();
    assert!(method.starts_with("quantization-aware training") && method.contains("distilled from the f32 model"));
    let (qat_acc, ptq_acc) = (top1(&q["test"]), top1(&summary["ptq_test"]));
    assert!(qat_acc > ptq_acc + 0.1, "QAT {qat_acc} vs PTQ {ptq_acc} at 2 bits");
    assert!((qat_acc - top1(&summary["simulated_test"])).abs() <= 0.01);
    assert!(summary["quantized_layers"].as_array().unwrap().iter().all(|l| l[1] == 2));
    assert_eq!(q["history"].as_array().unwrap().len(), 2, "one record per QAT epoch");
    assert!(q["file_bytes"].as_f64().unwrap() < 0.15 * base["file_bytes"].as_f64().unwrap());

    // Distillation: two cached teachers (the first is the baseline of stage 0, reused), their
    // ensemble, and two student seeds each distilled and trained alone; the current model is
    // then the (smaller) distilled student.
    let kd = report(dirs.iter().find(|d| d.contains("smoke_mlp_distill/")).unwrap());
    let (base, d) = (&kd["stages"][0], &kd["stages"][1]);
    assert_eq!(d["kind"], "distill");
    let summary = &d["distillation"];
    let teachers = summary["teachers"].as_array().unwrap();
    assert_eq!(teachers.len(), 2);
    assert!(teachers[0]["label"].as_str().unwrap().contains(base["cache_key"].as_str().unwrap()), "{teachers:?}");
    assert_eq!(teachers[0]["top1"], base["test"]["top1"], "teacher 0 is the stage-0 baseline");
    assert!(summary["ensemble"]["top1"].as_f64().unwrap() > 0.6);
    let runs = summary["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert!(
        runs.iter()
            .all(|r| r["scratch"]["top1"].as_f64().unwrap() > 0.3 && r["distilled"]["top1"].as_f64().unwrap() > 0.3)
    );
    assert_eq!(d["test"]["top1"], runs[0]["distilled"]["top1"], "the stage's model is the first distilled student");
    assert!(d["params"].as_u64().unwrap() < base["params"].as_u64().unwrap() / 3);
    assert_eq!(summary["teacher_outputs_cached"], false, "a hint pair needs the teacher on every batch");
    assert!(summary["objective"].as_str().unwrap().contains("1×1 conv 16→64"), "{}", summary["objective"]);
    assert!(summary["error_reduction"].is_number());

    // Unstructured pruning then int8: 80 % of the pruned layers' weights are zero after AGP
    // (conv1 left dense), the int8 model keeps those zeros, and accuracy holds.
    let pr = report(dirs.iter().find(|d| d.contains("smoke_lenet_prune/")).unwrap());
    let (base, p, q) = (&pr["stages"][0], &pr["stages"][1], &pr["stages"][2]);
    assert_eq!(p["kind"], "prune");
    let ps = &p["pruning"];
    assert!((ps["weight_sparsity"].as_f64().unwrap() - 0.8).abs() < 1e-3, "{ps}");
    assert_eq!(ps["events"].as_array().unwrap().len(), 4, "four AGP steps");
    let conv1 = p["layers"].as_array().unwrap().iter().find(|l| l["name"] == "conv1").unwrap();
    assert_eq!(conv1["nonzeros"], conv1["params"], "conv1 is skipped");
    assert!(p["nonzeros"].as_u64().unwrap() < base["nonzeros"].as_u64().unwrap() / 4);
    assert!(q["nonzeros"].as_u64().unwrap() <= p["nonzeros"].as_u64().unwrap(), "int8 keeps the zeros");
    assert!(p["test"]["top1"].as_f64().unwrap() >= base["test"]["top1"].as_f64().unwrap() - 0.05);
    assert_eq!(p["history"].as_array().unwrap().len(), 2);
    let sens = &ps["sensitivity"];
    assert_eq!(sens["evaluated_on"], "test");
    assert_eq!(sens["units"].as_array().unwrap().len(), 4, "conv2, fc1, fc2, fc3 (conv1 skipped)");
    let chart = sens["chart"].as_str().unwrap();
    let dir = dirs.iter().find(|d| d.contains("smoke_lenet_prune/")).unwrap();
    assert!(std::fs::read_to_string(root().join(dir).join(chart)).unwrap().contains("<svg"));

    // Lottery tickets with per-layer sparsities from a validation budget: two rounds, each
    // retraining for the stage's epochs; the chosen sparsities are what the masks reach.
    let lt = report(dirs.iter().find(|d| d.contains("smoke_mlp_lottery/")).unwrap());
    let p = &lt["stages"][1]["pruning"];
    assert_eq!(p["tickets"].as_array().unwrap().len(), 2);
    assert_eq!(lt["stages"][1]["history"].as_array().unwrap().len(), 6);
    assert_eq!(p["sensitivity"]["evaluated_on"], "validation");
    let chosen = p["sensitivity"]["chosen"].as_array().unwrap();
    assert_eq!(chosen.len(), 2, "fc1 and fc2");
    let fc1 = lt["stages"][1]["layers"].as_array().unwrap().iter().find(|l| l["name"] == "fc1").unwrap();
    let zero = 1.0 - fc1["nonzeros"].as_f64().unwrap() / fc1["params"].as_f64().unwrap();
    assert!((zero - chosen[0][1].as_f64().unwrap()).abs() < 0.01, "fc1: {zero} zero, {chosen:?} chosen");

    // Structured pruning: half the channels of every group, residual groups included, removed
    // in two rounds; the model really shrinks and the CPU plan runs it faster.
    let ch = report(dirs.iter().find(|d| d.contains("smoke_resnet_channels/")).unwrap());
    let (base, p) = (&ch["stages"][0], &ch["stages"][1]);
    let groups = p["pruning"]["groups"].as_array().unwrap();
    assert!(groups.iter().any(|g| g[0].as_str().unwrap().contains("stem.conv, layer1.0.2.conv")), "{groups:?}");
    assert!(groups.iter().all(|g| g[2].as_u64().unwrap() * 2 == g[1].as_u64().unwrap()), "{groups:?}");
    let macs = p["macs"].as_f64().unwrap() / base["macs"].as_f64().unwrap();
    assert!(macs < 0.3, "MACs ratio {macs}");
    assert!(p["file_bytes"].as_u64().unwrap() < base["file_bytes"].as_u64().unwrap() / 2);
    assert_eq!(p["pruning"]["events"].as_array().unwrap().len(), 2);

    // Second run: the baseline comes from the cache, with the same metrics.
    let second = xtask(&["run", "--out", &out_arg, "configs/smoke/mlp.toml"]);
    assert!(second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("reusing cached baseline"));
    let again = report(String::from_utf8(second.stdout).unwrap().trim());
    assert_eq!(again["stages"][0]["cached_baseline"], mlp["stages"][0]["cache_key"]);
    assert_eq!(again["stages"][1]["test"], mlp["stages"][1]["test"]);

    // Determinism: a fresh cache trains again and gets identical metrics.
    let other = tmp("smoke-fresh");
    let third = xtask(&["run", "-q", "--out", &other.display().to_string(), "configs/smoke/mlp.toml"]);
    assert!(third.status.success());
    let fresh = report(String::from_utf8(third.stdout).unwrap().trim());
    assert!(fresh["stages"][0]["cached_baseline"].is_null());
    assert_eq!(fresh["stages"][1]["test"], mlp["stages"][1]["test"]);
    let losses = |r: &serde_json::Value| -> Vec<f64> {
        r["stages"][0]["history"].as_array().unwrap().iter().map(|h| h["train_loss"].as_f64().unwrap()).collect()
    };
    assert_eq!(losses(&fresh), losses(&mlp));
}

#[test]
fn misspelt_key_exits_2_with_file_line_and_expected_keys() {
    let dir = tmp("typo");
    let text =
        std::fs::read_to_string(root().join("configs/smoke/mlp.toml")).unwrap().replace("epochs = 2", "epochz = 2");
    let line = text.lines().position(|l| l.starts_with("epochz")).unwrap() + 1;
    let path = dir.join("typo.toml");
    std::fs::write(&path, text).unwrap();
    let out = xtask(&["run", "--dry-run", &path.display().to_string()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("typo.toml:{line}:1")), "{err}");
    assert!(err.contains("unknown field `epochz`") && err.contains("`epochs`"), "{err}");
}

#[test]
fn a_kernel_path_this_cpu_lacks_or_that_does_not_exist_exits_2() {
    for value in ["sse9", "AVX512 "] {
        let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["run", "--dry-run", "configs/smoke/mlp.toml"])
            .env("SHRINK_ISA", value)
            .current_dir(root())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("SHRINK_ISA={value}")) && err.contains("portable"), "{err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["run", "--dry-run", "configs/smoke/mlp.toml"])
        .env("SHRINK_ISA", "portable")
        .current_dir(root())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A config over an IDX folder whose four files hold `header` followed by `data`.
fn idx_config(dir: &Path, header: &[u8], data: &[u8]) -> PathBuf {
    let idx = dir.join("idx");
    std::fs::create_dir_all(&idx).unwrap();
    for f in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    {
        std::fs::write(idx.join(f), [header, data].concat()).unwrap();
    }
    let text = std::fs::read_to_string(root().join("configs/smoke/mlp.toml"))
        .unwrap()
        .replace("kind = \"mnist5k\"", &format!("kind = \"idx\"\npath = \"{}\"", idx.display()));
    let path = dir.join("bad_data.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_damaged_idx_header_is_refused_before_anything_runs() {
    // The header claims 3 dimensions and ends inside the first: validation reads it (for the
    // images' shape) and refuses the config, naming the file and the byte; no run starts.
    let dir = tmp("badheader");
    let path = idx_config(&dir, &[0u8, 0, 8, 3, 0, 0, 0, 9], &[]);
    let out = xtask(&["run", "-q", "--out", &dir.join("runs").display().to_string(), &path.display().to_string()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("data.path") && err.contains("train-images-idx3-ubyte") && err.contains("byte 8"), "{err}");
    assert!(err.contains("ends inside the header"), "{err}");
    assert!(out.stdout.is_empty() && !dir.join("runs").exists());
}

#[test]
fn damaged_data_fails_with_a_report_and_exit_2() {
    // A sound header over data that stops short: the run starts, fails as it loads the data,
    // exits with 2 and leaves a report that names the file and the byte.
    let dir = tmp("baddata");
    let mut header = vec![0u8, 0, 8, 3];
    for d in [100u32, 28, 28] {
        header.extend_from_slice(&d.to_be_bytes());
    }
    let path = idx_config(&dir, &header, &[7; 50]);
    let out = xtask(&["run", "-q", "--out", &dir.join("runs").display().to_string(), &path.display().to_string()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("train-images-idx3-ubyte") && err.contains("byte 66"), "{err}");
    let run_dir = std::fs::read_dir(dir.join("runs/smoke_mlp")).unwrap().next().unwrap().unwrap().path();
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(run_dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["status"], "failed");
    assert!(r["error"].as_str().unwrap().contains("truncated"), "{}", r["error"]);
    assert!(!run_dir.join("model.safetensors").exists());
}

#[test]
fn labels_outside_the_classes_exit_2_naming_the_record() {
    // Digits 0–9 with one label damaged to 255 (which would silently make a 256-class model),
    // then a test label outside the training set's 10 classes.
    let dir = tmp("badlabels");
    let idx = |dims: &[u32], data: &[u8]| -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        dims.iter().for_each(|d| v.extend_from_slice(&d.to_be_bytes()));
        [v, data.to_vec()].concat()
    };
    let path = idx_config(&dir, &[], &[]);
    let folder = dir.join("idx");
    let labels: Vec<u8> = (0..40).map(|i| i % 10).collect();
    for split in ["train", "t10k"] {
        std::fs::write(folder.join(format!("{split}-images-idx3-ubyte")), idx(&[40, 28, 28], &[9; 40 * 784])).unwrap();
        std::fs::write(folder.join(format!("{split}-labels-idx1-ubyte")), idx(&[40], &labels)).unwrap();
    }
    let run = || xtask(&["run", "-q", "--out", &dir.join("runs").display().to_string(), &path.display().to_string()]);
    let mut damaged = labels.clone();
    damaged[17] = 255;
    std::fs::write(folder.join("train-labels-idx1-ubyte"), idx(&[40], &damaged)).unwrap();
    let out = run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("train-labels-idx1-ubyte: byte 25: record 17 has label 255"), "{err}");
    // Said once, without terminal colour codes (stderr is not a terminal here).
    assert_eq!(err.matches("record 17 has label 255").count(), 1, "{err}");
    assert!(!err.contains('\u{1b}'), "{err}");
    std::fs::write(folder.join("train-labels-idx1-ubyte"), idx(&[40], &labels)).unwrap();
    damaged = labels.clone();
    damaged[3] = 10;
    std::fs::write(folder.join("t10k-labels-idx1-ubyte"), idx(&[40], &damaged)).unwrap();
    let out = run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("t10k-labels-idx1-ubyte: byte 11: record 3 has label 10, outside the 10 classes"), "{err}");
}

#[test]
fn missing_backend_names_its_feature() {
    if cfg!(feature = "wgpu") {
        return;
    }
    let dir = tmp("wgpu");
    let text = std::fs::read_to_string(root().join("configs/smoke/mlp.toml"))
        .unwrap()
        .replace("threads = 1", "threads = 1\nbackend = \"wgpu\"");
    let path = dir.join("gpu.toml");
    std::fs::write(&path, text).unwrap();
    let out = xtask(&["run", "--dry-run", &path.display().to_string()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("feature `wgpu`"));
}

#[test]
fn every_broken_config_is_refused_with_its_expected_message() {
    // configs/broken/*.toml: each starts with `# expect: <text>`; a dry run must exit 2 and
    // print that text and the file's name, line and column, before anything is loaded.
    let broken = configs("configs/broken");
    assert!(broken.len() >= 40, "the corpus has {} configs", broken.len());
    for c in broken {
        let text = std::fs::read_to_string(root().join(&c)).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{c}: no expect line"));
        let out = xtask(&["run", "--dry-run", &c]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{c}: {err}");
        assert!(err.contains(expect), "{c}: expected `{expect}` in: {err}");
        assert!(err.contains(&c), "{c}: the message names the file: {err}");
        // And the line and column of the key at fault (a default names its table's line).
        let place = err.split_once(&format!("{c}:")).map(|(_, rest)| rest.split(':').take(2).collect::<Vec<_>>());
        assert!(
            place.is_some_and(|p| p.len() == 2 && p.iter().all(|n| n.parse::<usize>().is_ok())),
            "{c}: the message names the line and column: {err}"
        );
        assert!(out.stdout.is_empty(), "{c}: nothing on stdout");
    }
}

#[test]
fn a_run_killed_after_a_stage_resumes_there_and_ends_as_an_uninterrupted_one() {
    let config = "configs/smoke/lenet_prune.toml"; // train → prune (AGP, fine-tuning) → quantize
    let reference_out = tmp("resume-reference");
    let reference = xtask(&["run", "-q", "--out", &reference_out.display().to_string(), config]);
    assert!(reference.status.success(), "{}", String::from_utf8_lossy(&reference.stderr));
    let reference = report(String::from_utf8(reference.stdout).unwrap().trim());

    // The same run, killed with SIGKILL once the first stage's checkpoint is written.
    let out = tmp("resume");
    let out_arg = out.display().to_string();
    let killed_dir = kill_after_first_stage(&out_arg, config);
    let runs: Vec<PathBuf> =
        std::fs::read_dir(out.join("smoke_lenet_prune")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(runs, [killed_dir]);
    let killed = report(&runs[0].display().to_string());
    assert_eq!(killed["status"], "running");
    assert_eq!(killed["stages"].as_array().unwrap().len(), 1);
    assert!(runs[0].join("checkpoint/state.json").exists());
    assert!(!runs[0].join("model.safetensors").exists(), "no final model from an unfinished run");

    // The same command again finishes that run from its second stage.
    let again = xtask(&["run", "-q", "--out", &out_arg, config]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(PathBuf::from(String::from_utf8(again.stdout).unwrap().trim()), runs[0]);
    let resumed = report(&runs[0].display().to_string());
    assert_eq!(resumed["status"], "complete");
    assert_eq!(resumed["resumed"][0]["stages_kept"], 1);
    assert_eq!(resumed["resumed"][0]["previous_status"], "running");
    assert!(std::fs::read_to_string(runs[0].join("report.md")).unwrap().contains("resumed"));
    assert!(runs[0].join("model.safetensors").exists() && !runs[0].join("checkpoint").exists());
    // Metrics (times aside) equal the uninterrupted run's, stage by stage.
    for i in 0..3 {
        let (a, b) = (&resumed["stages"][i], &reference["stages"][i]);
        for key in ["test", "params", "nonzeros", "macs", "file_bytes", "kind"] {
            assert_eq!(a[key], b[key], "stage {i}: {key}");
        }
    }
    assert_eq!(resumed["stages"][1]["pruning"]["events"], reference["stages"][1]["pruning"]["events"]);
    let model = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    let reference_dir = std::fs::read_dir(reference_out.join("smoke_lenet_prune")).unwrap().next().unwrap();
    assert_eq!(model(&runs[0]), model(&reference_dir.unwrap().path()), "the same model file, byte for byte");

    // A complete run is not resumed: the next run of the config gets a directory of its own.
    let next = xtask(&["run", "-q", "--out", &out_arg, config]);
    assert!(next.status.success());
    let next = PathBuf::from(String::from_utf8(next.stdout).unwrap().trim());
    assert_ne!(next, runs[0]);

    // --fresh leaves an unfinished run alone and starts a directory of its own.
    let killed = kill_after_first_stage(&out_arg, config);
    let fresh = xtask(&["run", "-q", "--fresh", "--out", &out_arg, config]);
    assert!(fresh.status.success());
    let fresh = PathBuf::from(String::from_utf8(fresh.stdout).unwrap().trim());
    assert!(fresh != killed && fresh != next && fresh != runs[0]);
    assert_eq!(report(&killed.display().to_string())["status"], "running");
    assert!(report(&fresh.display().to_string())["resumed"].as_array().unwrap().is_empty());

    // A damaged checkpoint is an error that names the file and says how to start over: never a
    // silent restart, never a resume from a file that is not the one written.
    let damaged = kill_after_first_stage(&out_arg, config);
    let graph = damaged.join("checkpoint/stage-1/graph.safetensors");
    let mut bytes = std::fs::read(&graph).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&graph, bytes).unwrap();
    let refused = xtask(&["run", "-q", "--out", &out_arg, config]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(err.contains("graph.safetensors") && err.contains("--fresh"), "{err}");
}

#[test]
fn cached_baselines_are_checked_before_use() {
    let out = tmp("cache-check");
    let cache = out.join("cache");
    let (out_arg, cache_arg) = (out.display().to_string(), cache.display().to_string());
    // Without -q: the warnings are the point.
    let run = |config: &str| xtask(&["run", "--out", &out_arg, "--cache", &cache_arg, config]);
    let cached_model = |name: &str| -> PathBuf {
        let entries = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path());
        let metas: Vec<PathBuf> = entries.filter(|p| p.extension().is_some_and(|x| x == "json")).collect();
        let meta = metas
            .into_iter()
            .find(|m| std::fs::read_to_string(m).unwrap().contains(&format!("\"{name}\"")))
            .unwrap_or_else(|| panic!("no cache entry of {name}"));
        meta.with_extension("safetensors")
    };
    let first = run("configs/smoke/mlp.toml");
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let params = report(String::from_utf8(first.stdout).unwrap().trim())["stages"][0]["params"].clone();
    assert!(run("configs/smoke/mlp_dynamic.toml").status.success());

    // A valid model file of another model (mlp-64) under the baseline's key (mlp-32): found,
    // said, and the baseline trained again — the report is the baseline's.
    std::fs::copy(cached_model("mlp-64"), cached_model("mlp-32")).unwrap();
    let again = run("configs/smoke/mlp.toml");
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{err}");
    assert!(err.contains("cannot be used, training it again") && err.contains("SHA-256"), "{err}");
    assert_eq!(report(String::from_utf8(again.stdout).unwrap().trim())["stages"][0]["params"], params);
    // The entry rewritten, the next run reuses it without a word of warning.
    let reused = run("configs/smoke/mlp.toml");
    assert!(!String::from_utf8_lossy(&reused.stderr).contains("cannot be used"));
    // A damaged entry: the same.
    std::fs::write(cached_model("mlp-32").with_extension("json"), b"{ not json").unwrap();
    let err = String::from_utf8_lossy(&run("configs/smoke/mlp.toml").stderr).into_owned();
    assert!(err.contains("not a cache entry"), "{err}");

    // `--cache` naming a file fails before anything trains.
    let file = out.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let refused =
        xtask(&["run", "-q", "--out", &out_arg, "--cache", &file.display().to_string(), "configs/smoke/mlp.toml"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is not a directory"));
}

/// Runs `config` until its first stage's checkpoint is written, kills it with SIGKILL, and
/// returns its run directory (the newest under `out`).
fn kill_after_first_stage(out: &str, config: &str) -> PathBuf {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["run", "-q", "--out", out, config])
        .env("SHRINK_TEST_STOP_AFTER_STAGES", "1")
        .current_dir(root())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    assert!(stderr.lines().map_while(Result::ok).any(|l| l.contains("waiting to be killed")));
    child.kill().unwrap();
    child.wait().unwrap();
    let experiment = Path::new(out).join("smoke_lenet_prune");
    let newest = std::fs::read_dir(&experiment)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p.join("config.resolved.toml")).unwrap().modified().unwrap());
    newest.unwrap()
}

#[test]
fn onnx_models_from_pytorch_are_imported_compressed_and_reported() {
    // data/onnx: a ResNet- and a MobileNet-style classifier trained and exported by PyTorch,
    // with their test top-1 as PyTorch measured it.
    let pytorch: std::collections::HashMap<String, f64> =
        std::fs::read_to_string(root().join("data/onnx/pytorch_accuracy.txt"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once(' ').map(|(k, v)| (k.to_string(), v.parse().unwrap())))
            .collect();
    let out_dir = tmp("onnx");
    let out_arg = out_dir.display().to_string();
    let configs = ["configs/onnx_resnet_int8.toml", "configs/onnx_mobilenet_int8.toml"];
    let out = xtask(&["run", "-q", "--out", &out_arg, configs[0], configs[1]]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dirs: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(String::from).collect();
    for (dir, name) in dirs.iter().zip(["resnet_mnist", "mobilenet_mnist"]) {
        let r = report(dir);
        assert_eq!(r["status"], "complete", "{dir}");
        let stages = r["stages"].as_array().unwrap();
        let kinds: Vec<&str> = stages.iter().map(|s| s["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["evaluate", "train", "prune", "quantize", "evaluate"], "{dir}");
        let top1 = |i: usize| stages[i]["test"]["top1"].as_f64().unwrap();
        // Imported as it came, the model scores what it scored in PyTorch (one digit of slack
        // for a tie decided by float rounding).
        assert!((top1(0) - pytorch[name]).abs() <= 0.0011, "{name}: {} here, {} in PyTorch", top1(0), pytorch[name]);
        assert!(stages[2]["params"].as_u64() < stages[1]["params"].as_u64(), "{name}: channels removed");
        assert_eq!(stages[4]["evaluated_on"], "cpu-plan-int8", "{name}");
        assert!(top1(4) > 0.93, "{name}: int8 top-1 {}", top1(4));
        let (f32_bytes, int8_bytes) =
            (stages[0]["file_bytes"].as_u64().unwrap(), stages[4]["file_bytes"].as_u64().unwrap());
        assert!(int8_bytes * 3 < f32_bytes, "{name}: {f32_bytes} → {int8_bytes} bytes");
    }
    // `cargo xtask profile` shows where the integer MobileNet spends its time, step by step: its
    // depthwise convolutions on the integer kernel, its hard-swishes one step each.
    let out = xtask(&["profile", &dirs[1], "--repeats", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    for want in ["## f32 plan", "## integer plan", "conv2d/int8-depthwise", "hard_sigmoid+mul/f32"] {
        assert!(table.contains(want), "{want}: {table}");
    }
    let out = xtask(&["profile", &out_arg]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("model.safetensors"));
    // configs/onnx_mobilenet_prune.toml: channels removed through the inverted residuals (the
    // depthwise convolutions and SE blocks with their expansions) take at least 30 % of the
    // MACs, and fine-tuning brings the accuracy back within 2 pp of the fine-tuned model.
    let out = xtask(&["run", "-q", "--out", &out_arg, "configs/onnx_mobilenet_prune.toml"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = report(String::from_utf8(out.stdout).unwrap().trim());
    let stages = r["stages"].as_array().unwrap();
    let macs = |i: usize| stages[i]["macs"].as_f64().unwrap();
    assert!(macs(2) <= 0.7 * macs(1), "MACs {} → {}", macs(1), macs(2));
    let top1 = |i: usize| stages[i]["test"]["top1"].as_f64().unwrap();
    assert!(top1(2) >= top1(1) - 0.02, "top-1 {} → {}", top1(1), top1(2));
}

/// `bench-compare`, the pull-request gate: a gated ratio that fell by more than the tolerance
/// fails it (exit 1) and the table says which; within the tolerance it passes; a directory
/// without reports, or a report that is not one, is bad input (exit 2, naming the file).
#[test]
fn bench_compare_fails_on_a_ratio_regression_only() {
    let dir = tmp("bench-compare");
    let suite = |ratio: f64| {
        format!(
            r#"{{"suite": "onnxruntime", "threads": 1, "repeats": 3, "git_revision": "abc", "cpu": "test",
            "rows": [{{"name": "resnet20 b1 / shrink int8 plan", "value": 1.0, "unit": "ms", "gflops": 1.0,
            "ratio": {ratio}, "baseline": "onnxruntime int8"}}]}}"#
        )
    };
    for (name, ratio) in [("base", 1.30), ("slower", 1.10), ("noisy", 1.25)] {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        std::fs::write(dir.join(name).join("onnxruntime.json"), suite(ratio)).unwrap();
    }
    let path = |name: &str| dir.join(name).display().to_string();
    let out = xtask(&["bench-compare", &path("base"), &path("slower")]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("resnet20 b1 / shrink int8 plan") && table.contains("**regression**"), "{table}");
    let out = xtask(&["bench-compare", &path("base"), &path("noisy")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("gated, ok"));
    let out = xtask(&["bench-compare", &path("base"), &path("slower"), "--tolerance", "0.2"]);
    assert!(out.status.success());

    std::fs::create_dir_all(dir.join("empty")).unwrap();
    let out = xtask(&["bench-compare", &path("base"), &path("empty")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("share no bench suite"));
    std::fs::create_dir_all(dir.join("broken")).unwrap();
    std::fs::write(dir.join("broken").join("onnxruntime.json"), "{\"suite\": 3}").unwrap();
    let out = xtask(&["bench-compare", &path("base"), &path("broken")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("onnxruntime.json"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `config` with `threads = n`, written under `dir`.
fn at_threads(dir: &Path, config: &str, n: usize) -> String {
    let text = std::fs::read_to_string(root().join(config)).unwrap();
    let lines: Vec<String> = text.lines().filter(|l| !l.starts_with("threads =")).map(String::from).collect();
    let name = lines.iter().position(|l| l.starts_with("name =")).unwrap();
    let mut lines = lines;
    lines.insert(name + 1, format!("threads = {n}"));
    let path = dir.join(format!("{}-{n}.toml", Path::new(config).file_stem().unwrap().to_string_lossy()));
    std::fs::write(&path, lines.join("\n")).unwrap();
    path.display().to_string()
}

/// The cached files: name (the key) → bytes.
fn cache_files(cache: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

/// What lets sweep trials at other thread counts share a baseline: training gives the same
/// weights, bit for bit, at 1 and 3 threads (flex and ndarray, a ResNet with batch norms), and
/// the cache key leaves the thread count out.
#[test]
fn training_gives_the_same_weights_at_any_thread_count_and_one_cache_key() {
    let dir = tmp("threads-key");
    for config in ["configs/smoke/resnet_channels.toml", "configs/smoke/resnet_ndarray.toml"] {
        let mut caches = Vec::new();
        for n in [1, 3] {
            let cache = dir.join(format!("cache-{n}-{}", Path::new(config).file_stem().unwrap().to_string_lossy()));
            let run = xtask(&[
                "run",
                "-q",
                "--out",
                &dir.display().to_string(),
                "--cache",
                &cache.display().to_string(),
                &at_threads(&dir, config, n),
            ]);
            assert!(run.status.success(), "{config} at {n} threads: {}", String::from_utf8_lossy(&run.stderr));
            assert_eq!(report(String::from_utf8(run.stdout).unwrap().trim())["provenance"]["threads"], n);
            caches.push(cache_files(&cache));
        }
        assert!(!caches[0].is_empty());
        assert_eq!(
            caches[0].keys().collect::<Vec<_>>(),
            caches[1].keys().collect::<Vec<_>>(),
            "{config}: one key at 1 and 3 threads"
        );
        assert!(caches[0] == caches[1], "{config}: the weights trained at 1 and 3 threads differ");
    }
}

/// Two runs of one config started together on one cache: one trains the baseline, the other
/// waits for it and reuses it (no duplicate training, no torn file).
#[test]
fn concurrent_runs_train_a_shared_baseline_once() {
    let dir = tmp("concurrent-cache");
    let (out, cache) = (dir.display().to_string(), dir.join("cache").display().to_string());
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["run", "--out", &out, "--cache", &cache, "--fresh", "configs/smoke/resnet_channels.toml"])
            .current_dir(root())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let reports: Vec<serde_json::Value> = [a, b]
        .into_iter()
        .map(|c| {
            let o = c.wait_with_output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            report(String::from_utf8(o.stdout).unwrap().trim())
        })
        .collect();
    let reused = reports.iter().filter(|r| !r["stages"][0]["cached_baseline"].is_null()).count();
    assert_eq!(reused, 1, "exactly one of the two runs trains the baseline");
    assert_eq!(reports[0]["stages"][0]["test"], reports[1]["stages"][0]["test"]);
    assert_eq!(cache_files(&dir.join("cache")).len(), 1);
}
