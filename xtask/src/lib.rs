//! The parts of `cargo xtask` that other code reuses: the experiment config's schema and parser
//! ([`config`]) and the typed plan it validates into ([`plan`]). The fuzz target `config` drives
//! them; sweep files, their expansion into trials and Pareto fronts ([`sweep`]); search files and the accuracy-driven strategies ([`search`]); Slurm options and what `scontrol` says ([`slurm`]); the bench regression gate ([`bench_gate`]) and the ONNX Runtime bridge
//! ([`onnxruntime`]); the runner itself is the `xtask` binary.

pub mod bench_gate;
pub mod config;
pub mod onnxruntime;
pub mod plan;
pub mod search;
pub mod slurm;
pub mod sweep;
