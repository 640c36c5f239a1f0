//! ONNX Runtime as an independent check of shrink's exports: Python's `onnxruntime` (from PyPI)
//! runs the exported files through `scripts/ort_check.py`, compiled into the binary, on what
//! shrink wrote into a check directory (images, labels, shrink's logits, `check.json`).
//! Python rather than the `ort` crate: the PyPI wheel is what users have and what CI installs,
//! and its graph optimiser writes the optimised model (`optimized_model_filepath`) in which the
//! check reads which layers run on integer kernels.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// The check script, as committed.
pub const SCRIPT: &str = include_str!("../../scripts/ort_check.py");

/// The Python interpreter: `SHRINK_PYTHON`, or `python3`.
fn python() -> String {
    std::env::var("SHRINK_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Whether Python can import onnxruntime, onnx and numpy; the reason when it cannot.
///
/// # Errors
/// A sentence saying what is missing and how to install it.
pub fn available() -> std::result::Result<String, String> {
    let py = python();
    let out = Command::new(&py)
        .args(["-c", "import onnxruntime, onnx, numpy; print(onnxruntime.__version__)"])
        .output()
        .map_err(|e| format!("cannot run `{py}` ({e}); ONNX Runtime's check needs Python 3 with onnxruntime"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("").trim();
        return Err(format!(
            "`{py}` cannot import onnxruntime, onnx and numpy ({last}): `pip install onnxruntime onnx numpy`"
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// What `check.json` tells the script.
#[derive(Serialize)]
pub struct CheckSpec {
    /// `[channels, height, width]`.
    pub input_shape: [usize; 3],
    /// f32 images, `[n, c, h, w]`, little-endian.
    pub images: String,
    /// u32 labels.
    pub labels: String,
    /// The f32 model and shrink's logits for it.
    pub f32: Option<ModelCheck>,
    /// The QDQ model and shrink's integer plan's logits.
    pub int8: Option<ModelCheck>,
}

/// One model to check.
#[derive(Serialize)]
pub struct ModelCheck {
    /// The ONNX file.
    pub model: String,
    /// shrink's logits, f32 `[n, classes]`.
    pub shrink_logits: String,
    /// The step the logits' agreement is counted in (int8 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_step: Option<f32>,
    /// The layers shrink quantized (int8 only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<String>,
}

/// What ONNX Runtime measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrtResult {
    /// ONNX Runtime's version.
    pub onnxruntime: String,
    /// Images run.
    pub images: usize,
    /// The f32 file.
    pub f32: Option<OrtF32>,
    /// The QDQ file.
    pub int8: Option<OrtInt8>,
}

/// The f32 file in ONNX Runtime against shrink's f32 plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrtF32 {
    /// Largest |ORT − shrink| over the largest |logit|.
    pub max_relative_difference: f64,
    /// Top-1 of ONNX Runtime's logits.
    pub top1_onnxruntime: f64,
    /// Top-1 of shrink's.
    pub top1_shrink: f64,
}

/// The QDQ file in ONNX Runtime against shrink's integer plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrtInt8 {
    /// Top-1 of ONNX Runtime's logits.
    pub top1_onnxruntime: f64,
    /// Top-1 of shrink's integer plan.
    pub top1_shrink: f64,
    /// The unit of the agreement: the step of a u8 grid over the range of shrink's logits.
    pub output_step: f64,
    /// Share of logits within two steps.
    pub within_2_steps: f64,
    /// Largest difference, in steps.
    pub max_steps: f64,
    /// Operators of ONNX Runtime's optimised graph, with their counts.
    pub optimized_ops: std::collections::BTreeMap<String, usize>,
    /// For each quantized layer, the integer operator ONNX Runtime runs it as (none: f32).
    pub layers: std::collections::BTreeMap<String, Option<String>>,
}

/// Runs the script on `dir` (holding `check.json` and its files).
///
/// # Errors
/// When Python cannot run it, or it fails or prints something that is not its JSON.
pub fn check(dir: &Path) -> Result<OrtResult> {
    let script = dir.join("ort_check.py");
    std::fs::write(&script, SCRIPT).with_context(|| format!("cannot write {}", script.display()))?;
    let py = python();
    let out = Command::new(&py)
        .arg(&script)
        .arg(dir)
        .output()
        .with_context(|| format!("cannot run `{py}` for ONNX Runtime's check"))?;
    if !out.status.success() {
        bail!("ONNX Runtime's check failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!("ONNX Runtime's check printed something that is not its JSON: {}", String::from_utf8_lossy(&out.stdout))
    })
}

/// The benchmark server, as committed.
pub const BENCH_SCRIPT: &str = include_str!("../../scripts/ort_bench.py");

/// ONNX Runtime sessions in a Python child process that times its own runs
/// (`scripts/ort_bench.py`), so that a benchmark can interleave them with shrink's.
pub struct BenchServer {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    _script: TempScript,
}

/// The script written where the child reads it, removed on drop.
struct TempScript(std::path::PathBuf);

impl Drop for TempScript {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl BenchServer {
    /// Starts the server.
    ///
    /// # Errors
    /// When Python cannot start it.
    pub fn start() -> Result<Self> {
        use std::process::Stdio;
        let path = std::env::temp_dir().join(format!("shrink-ort-bench-{}.py", std::process::id()));
        std::fs::write(&path, BENCH_SCRIPT).with_context(|| format!("cannot write {}", path.display()))?;
        let script = TempScript(path);
        let py = python();
        let mut child = Command::new(&py)
            .arg(&script.0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start `{py}` for ONNX Runtime"))?;
        let stdin = child.stdin.take().context("the child's stdin")?;
        let stdout = std::io::BufReader::new(child.stdout.take().context("the child's stdout")?);
        Ok(Self { child, stdin, stdout, _script: script })
    }

    fn ask(&mut self, line: &str) -> Result<String> {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{line}").context("ONNX Runtime's server stopped")?;
        self.stdin.flush()?;
        let mut answer = String::new();
        if self.stdout.read_line(&mut answer)? == 0 {
            bail!("ONNX Runtime's server stopped after `{line}`");
        }
        Ok(answer.trim().to_string())
    }

    /// Creates session `id` for the ONNX file `path`, with one intra-op thread.
    ///
    /// # Errors
    /// When ONNX Runtime cannot load it.
    pub fn load(&mut self, id: &str, path: &Path) -> Result<()> {
        self.load_with_threads(id, path, 1)
    }

    /// As [`Self::load`], with `threads` intra-op threads.
    ///
    /// # Errors
    /// When ONNX Runtime cannot load it.
    pub fn load_with_threads(&mut self, id: &str, path: &Path, threads: usize) -> Result<()> {
        let answer = self.ask(&format!("load {id} {} {threads}", path.display()))?;
        if answer != "ok" {
            bail!("ONNX Runtime could not load {}: {answer}", path.display());
        }
        Ok(())
    }

    /// Milliseconds of one run of session `id` on a batch of `shape` (`[n, c, h, w]`).
    ///
    /// # Errors
    /// When the server fails.
    pub fn run(&mut self, id: &str, shape: [usize; 4]) -> Result<f64> {
        let answer = self.ask(&format!("run {id} {} {} {} {}", shape[0], shape[1], shape[2], shape[3]))?;
        answer.parse().with_context(|| format!("ONNX Runtime's server answered `{answer}`"))
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        use std::io::Write;
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}
