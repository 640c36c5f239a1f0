//! The workspace's dependency rules, read from `cargo metadata`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

fn metadata() -> serde_json::Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

const OURS: [&str; 7] =
    ["shrink-kernels", "shrink-core", "shrink-prune", "shrink-quant", "shrink-distill", "shrink-bench", "xtask"];
const BACKEND_FEATURES: [&str; 10] =
    ["flex", "ndarray", "wgpu", "vulkan", "metal", "webgpu", "cuda", "rocm", "cpu", "tch"];

/// kernels ← core ← prune/quant/distill: the technique crates reach the kernels through
/// shrink-core's re-export, and the kernel crate stands on nothing of ours and no burn.
#[test]
fn technique_crates_depend_on_shrink_core_only() {
    let meta = metadata();
    let packages = meta["packages"].as_array().unwrap();
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in packages {
        let name = p["name"].as_str().unwrap().to_string();
        let ours: Vec<String> = p["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_string())
            .filter(|d| OURS.contains(&d.as_str()))
            .collect();
        deps.insert(name, ours);
    }
    for c in ["shrink-prune", "shrink-quant", "shrink-distill"] {
        assert_eq!(deps[c], vec!["shrink-core".to_string()], "{c} may depend on shrink-core only");
    }
    assert_eq!(deps["shrink-core"], vec!["shrink-kernels".to_string()], "shrink-core stands on shrink-kernels only");
    assert!(deps["shrink-kernels"].is_empty(), "shrink-kernels depends on no shrink crate");
    let kernels = packages.iter().find(|p| p["name"] == "shrink-kernels").unwrap();
    for d in kernels["dependencies"].as_array().unwrap() {
        let dep = d["name"].as_str().unwrap();
        assert!(!dep.starts_with("burn"), "shrink-kernels depends on {dep}: the kernel crate has no burn");
    }
}

#[test]
fn only_shrink_core_names_burn_backend_features() {
    let meta = metadata();
    for p in meta["packages"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        // Direct dependencies on burn with backend features.
        for d in p["dependencies"].as_array().unwrap() {
            let dep = d["name"].as_str().unwrap();
            if dep.starts_with("burn") && name != "shrink-core" {
                assert!(
                    !dep.starts_with("burn-")
                        || !["burn-ndarray", "burn-wgpu", "burn-flex", "burn-cuda"].contains(&dep),
                    "{name} depends on {dep}"
                );
                for f in d["features"].as_array().unwrap() {
                    assert!(!BACKEND_FEATURES.contains(&f.as_str().unwrap()), "{name} enables burn feature {f}");
                }
            }
        }
        // Features that forward to burn's backend features.
        for (feature, enables) in p["features"].as_object().unwrap() {
            for e in enables.as_array().unwrap() {
                let e = e.as_str().unwrap();
                if let Some(f) = e.strip_prefix("burn/") {
                    assert!(
                        name == "shrink-core" || !BACKEND_FEATURES.contains(&f),
                        "{name}'s feature `{feature}` enables burn/{f}: only shrink-core may"
                    );
                }
            }
        }
    }
}

#[test]
fn burn_version_constant_matches_the_pin() {
    let toml = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml")).unwrap();
    assert!(toml.contains(&format!("burn = {{ version = \"={}\"", shrink_core::BURN_VERSION)));
}
