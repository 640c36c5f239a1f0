//! The parts of `cargo xtask` that other code reuses: the experiment config's parser and
//! validator (the fuzz target `config` drives it). The runner itself is the `xtask` binary.

pub mod config;
