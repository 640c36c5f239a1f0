//! Conformance against tests nobody here wrote: the ONNX project's node tests for every op
//! shrink imports, and its "light" model-zoo graphs, vendored by
//! `scripts/onnx_conformance_fixtures.py` into `tests/fixtures/onnx`; and, for what those leave
//! out, small cases of ours (`scripts/onnx_extra_cases.py`) whose expected outputs are ONNX
//! Runtime's.
//!
//! Each test model is imported and run on burn (flex) and on the CPU plan, both checked against
//! the expected outputs with the test's own tolerances (ONNX's defaults: rtol 1e-3, atol 1e-7).
//! A node test's extra inputs (weights, shapes, bounds) become initializers, as a model file
//! holds them; a rank-3 input to an element-wise-only test is viewed as `[n, 1, h, w]`, a
//! rank-1 input as `[1, n]` (shrink's values are images and vectors). Every outcome is counted: passed, refused at
//! import (with the reason), not applicable (inputs that are not f32 images or vectors), or
//! failed — and no test may fail. The README's conformance table is this test's output; it
//! fails when they differ (`SHRINK_UPDATE_README=1` rewrites the table).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use onnx_ir::{Message, ModelProto, TensorProto};
use shrink_core::burn::tensor::{Tensor, TensorData};
use shrink_core::onnx::{ImportOptions, import_bytes};
use shrink_core::{BackendKind, runtime};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/onnx");
const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
const BEGIN: &str = "<!-- onnx-conformance:begin -->";
const END: &str = "<!-- onnx-conformance:end -->";

/// Ops that compute element by element, whose tests may view a rank-3 input as an image.
const ELEMENTWISE: &[&str] = &[
    "Relu",
    "Sigmoid",
    "Clip",
    "HardSigmoid",
    "HardSwish",
    "LeakyRelu",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Sum",
    "Identity",
    "Dropout",
    "Swish",
    "Constant",
];

#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    Passed,
    Refused(String),
    NotApplicable(String),
    Failed(String),
}

fn floats(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_type != 1 {
        return None;
    }
    Some(if !t.float_data.is_empty() {
        t.float_data.clone()
    } else {
        t.raw_data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    })
}

fn read_tensor(path: &Path) -> TensorProto {
    TensorProto::parse_from_bytes(&std::fs::read(path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn tolerance(dir: &Path) -> (f32, f32) {
    let text = std::fs::read_to_string(dir.join("tolerance.txt")).unwrap_or_default();
    let get = |key: &str, default: f32| {
        text.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok())).unwrap_or(default)
    };
    (get("rtol", 1e-3), get("atol", 1e-7))
}

/// The largest `|got − want| − (atol + rtol·|want|)` (≤ 0 passes), or a length mismatch.
fn excess(got: &[f32], want: &[f32], rtol: f32, atol: f32) -> Result<f32, String> {
    if got.len() != want.len() {
        return Err(format!("{} values, expected {}", got.len(), want.len()));
    }
    Ok(got
        .iter()
        .zip(want)
        .map(
            |(g, w)| {
                if g.is_nan() || (g - w).abs().is_nan() { f32::INFINITY } else { (g - w).abs() - atol - rtol * w.abs() }
            },
        )
        .fold(f32::NEG_INFINITY, f32::max))
}

/// Imports `bytes` and runs it on `input` (`[n, …]`), checking burn and the CPU plan.
fn run_model(bytes: &[u8], name: &str, input: &[f32], batch: usize, want: &[f32], (rtol, atol): (f32, f32)) -> Outcome {
    let device = BackendKind::Flex.device().unwrap();
    let options = ImportOptions { keep_final_softmax: true, ..Default::default() };
    let imported = match import_bytes(bytes, Path::new(name), &options, &device) {
        Ok(i) => i,
        Err(e) => {
            let text = e.to_string();
            let reason = text.lines().filter(|l| !l.trim().is_empty()).nth(1).unwrap_or(&text).trim().to_string();
            return Outcome::Refused(reason);
        }
    };
    let graph = imported.graph;
    let [c, h, w] = graph.input_shape();
    if input.len() != batch * c * h * w {
        return Outcome::Failed(format!("input has {} values for [{batch}, {c}, {h}, {w}]", input.len()));
    }
    let x = Tensor::from_data(TensorData::new(input.to_vec(), [batch, c, h, w]), &device);
    let burn_out: Vec<f32> = graph.forward(x).into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    let plan_out = match runtime::freeze(&graph).and_then(|mut p| p.run(input, batch).map(|o| o.to_vec())) {
        Ok(o) => o,
        Err(e) => return Outcome::Failed(format!("CPU plan: {e}")),
    };
    for (what, got) in [("burn", &burn_out), ("CPU plan", &plan_out)] {
        match excess(got, want, rtol, atol) {
            Ok(e) if e <= 0.0 => {}
            Ok(e) => return Outcome::Failed(format!("{what}: off by {e:e} beyond tolerance")),
            Err(e) => return Outcome::Failed(format!("{what}: {e}")),
        }
    }
    Outcome::Passed
}

/// One node test: bind the extra inputs as initializers, view rank-3 inputs, run.
fn node_test(dir: &Path) -> (String, Outcome) {
    let mut model = ModelProto::parse_from_bytes(&std::fs::read(dir.join("model.onnx")).unwrap()).unwrap();
    let ops: Vec<String> = model.graph.node.iter().map(|n| n.op_type.clone()).collect();
    let mut key: Vec<String> = ops.iter().filter(|o| *o != "Constant").cloned().collect();
    key.dedup();
    let key = if key.is_empty() { "Constant".to_string() } else { key.join("+") };
    let data = dir.join("test_data_set_0");
    let inputs: Vec<TensorProto> =
        (0..model.graph.input.len()).map(|k| read_tensor(&data.join(format!("input_{k}.pb")))).collect();
    if model.graph.output.len() != 1 {
        return (key, Outcome::NotApplicable(format!("{} outputs", model.graph.output.len())));
    }
    let want = read_tensor(&data.join("output_0.pb"));
    let (Some(want), Some(first)) = (floats(&want), inputs.first()) else {
        return (key, Outcome::NotApplicable("not f32 in and out".into()));
    };
    let Some(x) = floats(first) else {
        return (key, Outcome::NotApplicable("not f32 in and out".into()));
    };
    for (k, t) in inputs.iter().enumerate().skip(1) {
        let mut t = t.clone();
        t.name = model.graph.input[k].name.clone();
        model.graph.mut_or_insert_default().initializer.push(t);
    }
    let graph = model.graph.mut_or_insert_default();
    graph.input.truncate(1);
    let dims: Vec<i64> = first.dims.clone();
    let elementwise = ops.iter().all(|o| ELEMENTWISE.contains(&o.as_str()));
    let viewed: Vec<i64> = match dims.len() {
        2 | 4 => dims.clone(),
        3 if elementwise => vec![dims[0], 1, dims[1], dims[2]],
        1 if elementwise => vec![1, dims[0]],
        r => return (key, Outcome::NotApplicable(format!("rank-{r} input"))),
    };
    let shape = &mut graph.input[0].type_.mut_or_insert_default().mut_tensor_type().shape.mut_or_insert_default().dim;
    shape.clear();
    for d in &viewed {
        let mut dim = onnx_ir::TensorShapeProto::default().dim.first().cloned().unwrap_or_default();
        dim.set_dim_value(*d);
        shape.push(dim);
    }
    graph.output[0].type_.mut_or_insert_default().mut_tensor_type().shape.clear();
    let bytes = model.write_to_bytes().unwrap();
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    (key, run_model(&bytes, &name, &x, viewed[0].max(1) as usize, &want, tolerance(dir)))
}

fn light_test(path: &Path) -> Outcome {
    let bytes = std::fs::read(path).unwrap();
    let model = ModelProto::parse_from_bytes(&bytes).unwrap();
    let inits: Vec<&str> = model.graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let input = model.graph.input.iter().find(|i| !inits.contains(&i.name.as_str())).unwrap();
    let dims: Vec<usize> = input.type_.tensor_type().shape.dim.iter().map(|d| d.dim_value().max(1) as usize).collect();
    // The runner's input: arange(n) / n in the input's shape.
    let n: usize = dims.iter().product();
    let x: Vec<f32> = (0..n).map(|i| (i as f64 / n as f64) as f32).collect();
    let want = floats(&read_tensor(&PathBuf::from(path.to_string_lossy().replace(".onnx", "_output_0.pb")))).unwrap();
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    run_model(&bytes, &name, &x, dims[0], &want, (1e-3, 1e-7))
}

fn outcome_text(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Passed => "passed".to_string(),
        Outcome::Refused(why) => format!("refused: {why}"),
        Outcome::NotApplicable(why) => format!("not applicable: {why}"),
        Outcome::Failed(why) => format!("**failed**: {why}"),
    }
}

fn table(
    nodes: &BTreeMap<String, Vec<(String, Outcome)>>,
    light: &[(String, Outcome)],
    extra: &[(String, Outcome)],
) -> String {
    let mut out = String::new();
    let count = |v: &[(String, Outcome)], f: fn(&Outcome) -> bool| v.iter().filter(|(_, o)| f(o)).count();
    let all: Vec<(String, Outcome)> = nodes.values().flatten().cloned().collect();
    out.push_str(&format!(
        "Node tests: **{} passed of {} run** ({} refused at import, {} not applicable, {} failed); light models: **{} of {}**.\n\n",
        count(&all, |o| *o == Outcome::Passed),
        all.len() - count(&all, |o| matches!(o, Outcome::NotApplicable(_))),
        count(&all, |o| matches!(o, Outcome::Refused(_))),
        count(&all, |o| matches!(o, Outcome::NotApplicable(_))),
        count(&all, |o| matches!(o, Outcome::Failed(_))),
        count(light, |o| *o == Outcome::Passed),
        light.len(),
    ));
    out.push_str("| ONNX op (node tests) | passed / run | refused at import | not applicable |\n|---|---|---|---|\n");
    for (op, tests) in nodes {
        let names = |f: fn(&Outcome) -> bool| -> String {
            let v: Vec<String> = tests
                .iter()
                .filter(|(_, o)| f(o))
                .map(|(n, _)| format!("`{}`", n.trim_start_matches("test_")))
                .collect();
            if v.is_empty() { "—".into() } else { v.join(", ") }
        };
        let na = count(tests, |o| matches!(o, Outcome::NotApplicable(_)));
        out.push_str(&format!(
            "| {op} | {} / {} | {} | {} |\n",
            count(tests, |o| *o == Outcome::Passed),
            tests.len() - na,
            names(|o| matches!(o, Outcome::Refused(_))),
            names(|o| matches!(o, Outcome::NotApplicable(_))),
        ));
    }
    out.push_str("\n| light model-zoo graph | result |\n|---|---|\n");
    for (name, outcome) in light {
        let name = name.trim_start_matches("light_").trim_end_matches(".onnx");
        out.push_str(&format!("| {name} | {} |\n", outcome_text(outcome)));
    }
    out.push_str(&format!(
        "\nCases the node tests leave out (`scripts/onnx_extra_cases.py`, expected outputs from ONNX Runtime): \
         **{} of {} passed**.\n\n| case | result |\n|---|---|\n",
        count(extra, |o| *o == Outcome::Passed),
        extra.len()
    ));
    for (name, outcome) in extra {
        out.push_str(&format!("| {name} | {} |\n", outcome_text(outcome)));
    }
    out
}

#[test]
fn onnx_conformance() {
    let mut dirs: Vec<PathBuf> =
        std::fs::read_dir(Path::new(FIXTURES).join("node")).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.sort();
    let mut nodes: BTreeMap<String, Vec<(String, Outcome)>> = BTreeMap::new();
    for dir in &dirs {
        let (op, outcome) = node_test(dir);
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        if std::env::var_os("SHRINK_CONFORMANCE_VERBOSE").is_some() {
            eprintln!("{name}: {outcome:?}");
        }
        nodes.entry(op).or_default().push((name, outcome));
    }
    let mut light_paths: Vec<PathBuf> = std::fs::read_dir(Path::new(FIXTURES).join("light"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    light_paths.sort();
    let light: Vec<(String, Outcome)> =
        light_paths.iter().map(|p| (p.file_name().unwrap().to_string_lossy().to_string(), light_test(p))).collect();
    let mut extra_dirs: Vec<PathBuf> =
        std::fs::read_dir(Path::new(FIXTURES).join("extra")).unwrap().map(|e| e.unwrap().path()).collect();
    extra_dirs.sort();
    let extra: Vec<(String, Outcome)> =
        extra_dirs.iter().map(|d| (d.file_name().unwrap().to_string_lossy().to_string(), node_test(d).1)).collect();
    let failed: Vec<String> = nodes
        .values()
        .flatten()
        .chain(&light)
        .chain(&extra)
        .filter_map(|(n, o)| if let Outcome::Failed(why) = o { Some(format!("{n}: {why}")) } else { None })
        .collect();
    let generated = table(&nodes, &light, &extra);
    let readme = std::fs::read_to_string(README).unwrap();
    let (Some(b), Some(e)) = (readme.find(BEGIN), readme.find(END)) else { panic!("README lacks the {BEGIN} markers") };
    let current = &readme[b + BEGIN.len()..e];
    if current.trim() != generated.trim() {
        if std::env::var_os("SHRINK_UPDATE_README").is_some() {
            let updated = format!("{}{BEGIN}\n{}\n{}", &readme[..b], generated.trim(), &readme[e..]);
            std::fs::write(README, updated).unwrap();
        } else {
            panic!(
                "the README's conformance table is not this run's (SHRINK_UPDATE_README=1 rewrites it):\n{generated}"
            );
        }
    }
    assert!(failed.is_empty(), "conformance failures:\n{}", failed.join("\n"));
}
