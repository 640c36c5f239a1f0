//! ONNX export from the runner, checked by ONNX Runtime itself (#20): the smoke LeNet and the
//! ResNet-20 of `configs/resnet_int8.toml` run with `[export] onnx = true, check_onnxruntime =
//! true`; ONNX Runtime (Python's onnxruntime) runs both files on the test digits. The f32 file
//! gives shrink's f32 plan's logits within 1e-4 relative; the QDQ file's top-1 is within 0.1 pp
//! of shrink's integer plan, ≥ 99.9 % of its logits within two output steps, every layer
//! shrink quantized runs on an integer operator in ONNX Runtime's optimised graph, and the
//! file is at most 0.27× the f32 one. The imported MobileNet of `configs/onnx_mobilenet_int8.toml`
//! too, its five depthwise convolutions integer layers in both runtimes (≥ 99 % of its logits
//! within two steps, the file at most 0.5×: see the test). `cargo xtask export` writes the same file from the
//! run directory, and `cargo xtask bench onnxruntime` times it on both runtimes. Where
//! onnxruntime is not installed the test says so and passes, unless
//! `SHRINK_REQUIRE_ONNXRUNTIME=1` (CI installs it and sets that).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).current_dir(root()).output().unwrap()
}

fn onnxruntime_installed() -> bool {
    match xtask::onnxruntime::available() {
        Ok(version) => {
            eprintln!("ONNX Runtime {version}");
            true
        }
        Err(why) => {
            assert!(
                std::env::var("SHRINK_REQUIRE_ONNXRUNTIME").as_deref() != Ok("1"),
                "SHRINK_REQUIRE_ONNXRUNTIME=1 but {why}"
            );
            eprintln!("skipped: {why}");
            false
        }
    }
}

/// `config` with ONNX Runtime's check turned on, written into `dir`.
fn with_check(config: &str, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(root().join(config)).unwrap();
    let text = match text.find("[export]\n") {
        Some(at) => format!("{}[export]\ncheck_onnxruntime = true\n{}", &text[..at], &text[at + 9..]),
        None => format!("{text}\n[export]\nonnx = true\ncheck_onnxruntime = true\n"),
    };
    let path = dir.join(Path::new(config).file_name().unwrap());
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn exported_models_run_in_onnx_runtime_as_in_shrink() {
    if !onnxruntime_installed() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("shrink-onnx-export-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for config in ["configs/smoke/lenet_int8.toml", "configs/resnet_int8.toml", "configs/onnx_mobilenet_int8.toml"] {
        // The imported MobileNet (depthwise convolutions, hard-swish, squeeze-and-excitation):
        // its per-channel scales weigh more in a small file, and ONNX Runtime computes its
        // hard-swish and SE products between integer layers in its own order.
        let mobilenet = config.contains("mobilenet");
        let path = with_check(config, &dir);
        let out_dir = dir.join("runs").display().to_string();
        let out = xtask(&["run", "-q", "--out", &out_dir, &path.display().to_string()]);
        assert!(out.status.success(), "{config}: {}", String::from_utf8_lossy(&out.stderr));
        let run_dir = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        let run_dir = if run_dir.is_absolute() { run_dir } else { root().join(run_dir) };
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run_dir.join("report.json")).unwrap()).unwrap();
        let export = &report["export"];
        let files = export["files"].as_array().unwrap();
        let size = |i: usize| files[i]["bytes"].as_f64().unwrap();
        assert_eq!(files[0]["file"], "model.onnx", "{config}");
        assert_eq!(files[1]["file"], "model.int8.onnx", "{config}");
        let ratio = size(1) / size(0);
        let most = if mobilenet { 0.5 } else { 0.27 };
        assert!(ratio <= most, "{config}: the QDQ file is {ratio:.3}× the f32 one");
        let ort = &export["onnxruntime"];
        let f32 = &ort["f32"];
        let rel = f32["max_relative_difference"].as_f64().unwrap();
        assert!(rel <= 1e-4, "{config}: f32 logits differ by {rel:e} relative");
        let int8 = &ort["int8"];
        let (theirs, ours) = (int8["top1_onnxruntime"].as_f64().unwrap(), int8["top1_shrink"].as_f64().unwrap());
        assert!(
            (theirs - ours).abs() <= 0.001 + 1e-9,
            "{config}: int8 top-1 {theirs} in ONNX Runtime, {ours} in shrink"
        );
        let within = int8["within_2_steps"].as_f64().unwrap();
        let least = if mobilenet { 0.99 } else { 0.999 };
        assert!(within >= least, "{config}: {within} of the logits within two output steps");
        let layers = int8["layers"].as_object().unwrap();
        assert!(!layers.is_empty());
        for (layer, op) in layers {
            assert!(op.is_string(), "{config}: ONNX Runtime runs `{layer}` in f32 ({:?})", int8["optimized_ops"]);
        }
        if mobilenet {
            // The depthwise convolutions are integer layers in both runtimes.
            let depthwise = layers.iter().filter(|(l, op)| l.contains("depthwise") && op.is_string()).count();
            assert_eq!(depthwise, 5, "{config}: {layers:?}");
        }
        // The report says what was checked.
        let md = std::fs::read_to_string(run_dir.join("report.md")).unwrap();
        assert!(md.contains("Checked by ONNX Runtime"), "{config}");
        // `cargo xtask export` writes the same QDQ file from the run directory.
        let again = dir.join("again.onnx");
        let out = xtask(&["export", &run_dir.display().to_string(), "--onnx", &again.display().to_string()]);
        assert!(out.status.success(), "{config}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(run_dir.join("model.int8.onnx")).unwrap(), "{config}");
        // `cargo xtask bench onnxruntime` times the run's model on both runtimes.
        let bench_dir = dir.join("bench-out");
        let args = ["bench", "onnxruntime", "--repeats", "1", "--out", &bench_dir.display().to_string()];
        let out = xtask(&[&args[..], &["--run", &run_dir.display().to_string()]].concat());
        assert!(out.status.success(), "{config}: {}", String::from_utf8_lossy(&out.stderr));
        let bench: serde_json::Value =
            serde_json::from_slice(&std::fs::read(bench_dir.join("bench/onnxruntime.json")).unwrap()).unwrap();
        let rows = bench["rows"].as_array().unwrap();
        // shrink f32 (direct and im2col), shrink int8, ONNX Runtime f32 and int8 at batch 1 and
        // 64; then at batch 1, idle and beside busy threads: four runners at one and two
        // threads, and shrink's two plans against ONNX Runtime at two threads.
        assert_eq!(rows.len(), 10 + 2 * (8 + 2), "{config}: 5 runners at batch 1 and 64, then the threads cases");
        let threads = rows.iter().filter(|r| r["name"].as_str().unwrap().contains("b1, 2 threads")).count();
        assert_eq!(threads, 4, "{config}: shrink's plans against ONNX Runtime at two threads, idle and busy");
        assert!(rows.iter().all(|r| r["value"].as_f64().unwrap() > 0.0), "{config}");
    }
    // A run directory without a model is bad input: exit 2 naming the file.
    let out = xtask(&["export", &dir.display().to_string(), "--onnx", &dir.join("x.onnx").display().to_string()]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("model.safetensors"));
    let _ = std::fs::remove_dir_all(&dir);
}
